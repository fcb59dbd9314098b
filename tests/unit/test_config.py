import pytest

from configs import ConfigError, FunnelConfig, flatten, load_config, to_dict
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["tiny", "small", "large"])
def test_presets_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, FunnelConfig)
    assert cfg.data.source == "simulator"


def test_override_sets_nested_value():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["world.num_users=5000", "data.negative_sampling=uniform"])
    assert cfg.world.num_users == 5000
    assert cfg.data.negative_sampling == "uniform"


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"world\.num_user'.*did you mean world\.num_users"):
        load_config(None, ["world.num_user=5"])
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(None, ["nope.x=1"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("world.num_users=many", r"world\.num_users: expected an integer"),
        ("world.num_users=1.5", r"world\.num_users: expected an integer"),
        ("data.progress=3", r"data\.progress: expected true/false"),
        ("data.source=kafka", r"data\.source: 'kafka' is not one of"),
        ("data.extra_event_kinds=buy", r"data\.extra_event_kinds: expected a list"),
    ],
)
def test_wrong_types_are_errors_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["world.num_users"])


def test_yaml_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  sourse: simulator\n")
    with pytest.raises(ConfigError, match=r"data\.sourse.*did you mean data\.source"):
        load_config(p)


def test_section_must_be_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("world: 3\n")
    with pytest.raises(ConfigError, match="world: expected a mapping for section WorldConfig"):
        load_config(p)


def test_flatten_is_what_mlflow_logs():
    flat = flatten(to_dict(FunnelConfig()))
    assert flat["world.num_users"] == 300
    assert flat["abtest.arms.control"] == 50
    assert all("." in k for k in flat)


def test_every_model_config_is_a_validated_section():
    cfg = load_config(ROOT / "configs/small.yaml", ["model.cdnet.topk_ratio=0.3", "model.adaf2m2.alpha=0.5"])
    assert cfg.model.cdnet.topk_ratio == 0.3
    assert flatten(to_dict(cfg))["model.cdnet.topk_ratio"] == 0.3  # logged to MLflow with the rest
    with pytest.raises(ConfigError, match=r"model\.cdnet\.topk_ration'.*did you mean model\.cdnet\.topk_ratio"):
        load_config(None, ["model.cdnet.topk_ration=0.3"])
    with pytest.raises(ConfigError, match=r"model\.dlf\.layers: expected an integer"):
        load_config(None, ["model.dlf.layers=deep"])


def test_params_for_builds_from_the_section_with_overrides_on_top():
    cfg = load_config(None, ["model.cdnet.bins=20"])
    p = cfg.model.params_for("cdnet", {"topk_ratio": 0.5})
    assert p["bins"] == 20 and p["topk_ratio"] == 0.5 and p["embed_dim"] == cfg.model.cdnet.embed_dim
    ada = cfg.model.params_for("adaf2m2:dlf", {"adaf2m2": {"alpha": 0.7}})
    assert ada["base"] == to_dict(cfg.model.dlf) and ada["adaf2m2"]["alpha"] == 0.7
    assert ada["adaf2m2"]["k"] == cfg.model.adaf2m2.k
    tiny = load_config(ROOT / "configs/tiny.yaml").model
    assert tiny.params_for("lrea")["rank"] == 4  # the tiny preset
    with pytest.raises(ConfigError, match="no config section"):
        cfg.model.params_for("nope")


def test_a_stage_marker_resumes_only_under_the_same_effective_config(tmp_path):
    """The marker carries a hash of the YAML plus every --set: a changed override re-runs the stage, naming the key."""
    import json

    from jobs.e2e import config_hash, marker_state

    base = flatten(to_dict(load_config(ROOT / "configs" / "tiny.yaml")))
    marker = tmp_path / "train.json"
    assert marker_state(marker, base) == (False, "not run yet")
    marker.write_text(json.dumps({"seconds": 1.0, "config_hash": config_hash(base), "config": base}))
    done, why = marker_state(marker, base)
    assert done and "done earlier" in why
    changed = {**base, "train.epochs": base["train.epochs"] + 1}  # what `--set train.epochs=...` does
    done, why = marker_state(marker, changed)
    assert not done and "train.epochs" in why and "running it again" in why
    marker.write_text(json.dumps({"seconds": 1.0}))  # an earlier Funnel's marker: no hash
    assert marker_state(marker, base)[0] is False


def test_artifact_locations_with_a_scheme_are_not_local_folders():
    """mlflow-artifacts:/funnel (the server-proxied store the MLflow README recommends) has no "//"."""
    from training.registry import is_uri

    assert is_uri("mlflow-artifacts:/funnel") and is_uri("s3://b/mlflow") and is_uri("file:///tmp/a")
    assert not is_uri("runs/mlartifacts") and not is_uri("/abs/path") and not is_uri("./x:y")
