"""MLflow (real, SQLite + local artifacts): run logging, the model format, the registry gate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from configs import FunnelConfig, TrackingConfig
from models import build_model
from models.spec import FeatureSpec
from tests.models.conftest import make_batch
from training.registry import load_model, log_run, register_with_gate, save_model_dir


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return dataclasses.replace(FunnelConfig(), tracking=TrackingConfig(
        uri="sqlite:///runs/mlflow.db", artifact_location="runs/mlartifacts", experiment="test"))


@pytest.fixture
def data_dir(tmp_path):
    import json

    d = tmp_path / "data"
    d.mkdir()
    (d / "feature_spec.json").write_text(json.dumps({"fingerprint": "fp-1"}))
    return d


def _run(cfg, data_dir, auc: float, name="dcnv2", seed=0):
    spec = FeatureSpec.tiny()
    torch.manual_seed(seed)
    m = build_model(name, spec, {"embed_dim": 8, "hidden": [16]})
    hist = [{"epoch": 0, "val_auc": auc - 0.01}, {"epoch": 1, "val_auc": auc}]
    return log_run(cfg, name, {"embed_dim": 8, "hidden": [16]}, hist, {"test_auc": auc}, data_dir, m, spec), m


def test_model_folder_round_trip_without_pickle(tmp_path):
    spec = FeatureSpec.tiny()
    torch.manual_seed(0)
    m = build_model("adaf2m2:dlf", spec, {"base": {"embed_dim": 8, "layers": 1, "rank": 4, "n_low": 2, "n_high": 2,
                                                  "n_implicit": 2, "block_hidden": [8], "hidden": [8]}}).eval()
    d = save_model_dir(m, "adaf2m2:dlf", {"base": {"embed_dim": 8, "layers": 1, "rank": 4, "n_low": 2, "n_high": 2,
                                                   "n_implicit": 2, "block_hidden": [8], "hidden": [8]}}, spec,
                       tmp_path / "m")
    assert sorted(p.name for p in d.iterdir()) == ["model.json", "weights.safetensors"]
    b = make_batch(spec)
    with torch.no_grad():
        assert torch.equal(load_model(str(d))(b).logits, m(b).logits)


def test_gate_promotes_only_better_models(cfg, data_dir):
    import mlflow

    r1, _ = _run(cfg, data_dir, 0.70)
    d1 = register_with_gate("dcnv2", r1)
    assert d1["challenger"] and d1["reason"] == "no champion yet"
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("funnel-dcnv2", "champion", d1["version"])  # as the A/B would

    r2, _ = _run(cfg, data_dir, 0.65, seed=1)
    d2 = register_with_gate("dcnv2", r2)
    assert not d2["challenger"] and d2["champion_value"] == pytest.approx(0.70)
    assert int(client.get_model_version_by_alias("funnel-dcnv2", "challenger").version) == d1["version"]
    tags = client.get_model_version("funnel-dcnv2", str(d2["version"])).tags
    assert tags["gate.challenger"] == "False" and "0.65000 <= champion 0.70000" in tags["gate.reason"]

    r3, m3 = _run(cfg, data_dir, 0.75, seed=2)
    d3 = register_with_gate("dcnv2", r3)
    assert d3["challenger"]
    loaded = load_model("models:/funnel-dcnv2@challenger")
    b = make_batch(FeatureSpec.tiny())
    with torch.no_grad():
        assert torch.equal(loaded(b).logits, m3.eval()(b).logits)
    r4, _ = _run(cfg, data_dir, 0.72, seed=3)  # beats the champion, not the current challenger
    d4 = register_with_gate("dcnv2", r4)
    assert not d4["challenger"] and "0.72000 <= challenger 0.75000" in d4["reason"]
    assert int(client.get_model_version_by_alias("funnel-dcnv2", "challenger").version) == d3["version"]
    run = client.get_run(r3)
    assert run.data.params["model.name"] == "dcnv2" and run.data.params["world.num_users"] == "300"
    assert run.data.tags["dataset_fingerprint"] == "fp-1" and len(run.data.tags["git_commit"]) >= 7
    assert [m.step for m in client.get_metric_history(r3, "val_auc")] == [0, 1]


def test_promotion_moves_champion_to_the_versions_the_ab_served(cfg, data_dir):
    """A significant lift promotes what the A/B tested, even if `challenger` moved since; none moves otherwise."""
    import mlflow

    from abtest.promotion import promote
    from training.registry import registered_name

    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, retriever="dcnv2", preranker="dcnv2",
                                                             ranker="dcnv2"))
    v1 = register_with_gate("dcnv2", _run(cfg, data_dir, 0.70)[0])["version"]
    v2 = register_with_gate("dcnv2", _run(cfg, data_dir, 0.75, seed=1)[0])["version"]  # challenger moved on
    client = mlflow.MlflowClient()  # after the runs: they set the tracking URI
    name = registered_name("dcnv2")
    ab = {"run_id": "r-ab", "significant_positive": False, "lift": {"relative": 0.01, "ci_low": -0.02, "ci_high": 0.04},
          "srm": {"mismatch": False}, "treatment_versions": {name: str(v1)}}
    out = promote(cfg, ab)
    assert not out["promoted"] and "champion" not in client.get_registered_model(name).aliases
    assert client.get_model_version(name, str(v1)).tags["promotion.promoted"] == "False"
    out = promote(cfg, ab | {"significant_positive": True, "lift": {"relative": 0.1, "ci_low": 0.03, "ci_high": 0.17}})
    assert out["promoted"] and int(client.get_model_version_by_alias(name, "champion").version) == v1
    assert int(client.get_model_version_by_alias(name, "challenger").version) == v2
    tags = client.get_model_version(name, str(v1)).tags
    assert tags["promotion.abtest_run_id"] == "r-ab" and tags["promotion.lift"] == "+0.1000"
    # an alias that moved mid-test: two version sets served the treatment arm → nothing moves
    mixed = ab | {"significant_positive": True, "treatment_versions": {},
                  "treatment_version_sets": [f"{name}/{v1}", f"{name}/{v2}"]}
    out = promote(cfg, mixed)
    assert not out["promoted"] and int(client.get_model_version_by_alias(name, "champion").version) == v1
    assert "one set of model versions" in out["models"][name]["reason"]
    assert not promote(cfg, {k: v for k, v in ab.items() if k != "treatment_versions"}
                       | {"significant_positive": True})["promoted"]  # no record of what served: refused


def test_gate_reevaluates_the_champion_on_new_data_for_a_daily_retrain(cfg, data_dir):
    """New logs (another fingerprint): the champion is scored on the new test split and the
    new version is compared with that, not refused."""
    import json

    import mlflow

    r1, _ = _run(cfg, data_dir, 0.70)
    d1 = register_with_gate("dcnv2", r1)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("funnel-dcnv2", "champion", d1["version"])
    (data_dir / "feature_spec.json").write_text(json.dumps({"fingerprint": "fp-2"}))
    asked = []

    def reevaluate(uri):
        asked.append(uri)
        return 0.60  # the old champion on the new data

    d2 = register_with_gate("dcnv2", _run(cfg, data_dir, 0.65)[0], reevaluate=reevaluate)
    assert d2["challenger"] and d2["champion_value"] == 0.60 and d2["champion_reevaluated_on"] == "fp-2"
    assert asked == [f"models:/funnel-dcnv2/{d1['version']}"]
    d3 = register_with_gate("dcnv2", _run(cfg, data_dir, 0.62, seed=1)[0], reevaluate=reevaluate)
    assert not d3["challenger"] and "0.62000 <= challenger 0.65000" in d3["reason"]
    assert asked == [asked[0]]  # the re-evaluation is recorded on the champion and reused
    tags = client.get_model_version("funnel-dcnv2", str(d1["version"])).tags
    assert tags["gate.reevaluated.fp-2.test_auc"] == "0.6"


def test_gate_refuses_to_compare_across_datasets(cfg, data_dir, tmp_path):
    import json

    import mlflow

    r1, _ = _run(cfg, data_dir, 0.70)
    d1 = register_with_gate("dcnv2", r1)
    mlflow.MlflowClient().set_registered_model_alias("funnel-dcnv2", "champion", d1["version"])
    (data_dir / "feature_spec.json").write_text(json.dumps({"fingerprint": "fp-2"}))
    r2, _ = _run(cfg, data_dir, 0.99)
    d2 = register_with_gate("dcnv2", r2)
    assert not d2["challenger"] and "another dataset" in d2["reason"]


@pytest.mark.parametrize("encoder", ["small", "features"])
def test_karma_folder_round_trip_is_self_contained(tmp_path, encoder):
    from models.karma import KARMA, KARMAConfig

    g = torch.Generator().manual_seed(0)
    titles = torch.randint(2, 40, (31, 6), generator=g)
    titles[0] = 0
    feats = torch.randn(31, 12, generator=g) if encoder == "features" else None
    torch.manual_seed(0)
    m = KARMA(KARMAConfig(**{**vars(KARMAConfig.tiny()), "text_encoder": encoder}), titles, 8, feats).eval()
    d = save_model_dir(m, "karma", None, None, tmp_path / "karma")
    loaded = load_model(str(d))
    hist, lens = torch.randint(1, 31, (4, 8), generator=g), torch.tensor([0, 3, 8, 5])
    keys = torch.arange(1, 31)
    with torch.no_grad():
        assert torch.equal(loaded.titles, titles)
        assert torch.allclose(loaded.encode_items(keys), m.encode_items(keys))
        assert torch.allclose(loaded.encode_users(hist, lens), m.encode_users(hist, lens))
