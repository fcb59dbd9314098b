"""`jobs.e2e` on the tiny world: every stage ran, its markers, its registry, and a second run resumes."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]  # the e2e fixture runs every stage


STAGES = ["ingest", "train", "tune", "index", "deploy", "abtest", "promote"]


def test_e2e_runs_every_stage_and_resumes(e2e_run, capsys):
    import mlflow

    from jobs import e2e

    root = e2e_run["root"]
    markers = {s: json.loads((root / "runs" / "e2e" / "tiny" / f"{s}.json").read_text()) for s in STAGES}
    stats = json.loads((e2e_run["processed"] / "stats.json").read_text())
    assert markers["ingest"]["fingerprint"] == stats["fingerprint"]
    assert stats["input_rows"]["events"] == stats["accepted_events"] + stats["rejected_events"]
    assert {m: markers["train"][m]["registered"] for m in ("karma", "lrea", "cdnet")} == {
        "karma": "funnel-karma", "lrea": "funnel-lrea", "cdnet": "funnel-cdnet"}
    assert "test_hr_50" in markers["train"]["karma"] and "test_auc" in markers["train"]["cdnet"]
    # the fits are 1-worker TorchTrainers; one short epoch still learns the tiny world
    assert markers["train"]["cdnet"]["test_auc"] > 0.6 and markers["train"]["lrea"]["test_auc"] > 0.6
    assert {"test_gauc", "test_logloss", "test_auc_new_users", "test_auc_cold_items"} <= set(markers["train"]["cdnet"])
    assert 0.0 <= markers["train"]["karma"]["test_hr_50"] <= 1.0 and "test_user_eff_rank" in markers["train"]["karma"]
    assert markers["index"]["ntotal"] == 500 and markers["index"]["factory"] == "Flat"
    ab = json.loads((root / "runs" / "abtest" / "last.json").read_text())
    assert set(ab["arms"]) == {"control", "treatment"} and ab["sent"]["requests"] == 100
    assert (root / "runs" / "abtest" / "last.png").stat().st_size > 1000
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("funnel-cdnet", "challenger")
    assert mv.tags["promotion.promoted"] == str(markers["promote"]["promoted"])  # the evidence is on the version
    assert mv.tags["promotion.abtest_run_id"] == ab["run_id"]
    assert "index.factory" in client.get_model_version_by_alias("funnel-karma", "challenger").tags
    # tune: a two-trial search (ASHA + Optuna), one MLflow run per trial, its table and plot logged
    tune = markers["tune"]
    assert tune["model"] == "funnel-cdnet" and tune["metric"] == "test_auc" and 0.0 < tune["best"]["val_auc"] <= 1.0
    assert len(client.search_runs([client.get_experiment_by_name("funnel-tune").experiment_id])) == 2
    [summary] = client.search_runs([client.get_experiment_by_name("funnel").experiment_id],
                                   filter_string="tags.`mlflow.runName` = 'tune-cdnet'")
    arts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"tune_results.csv", "tune_knobs.png"} <= arts, arts
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        capsys.readouterr()
        assert e2e.main(e2e_run["args"]) == 0  # resumes: every finished stage is skipped
    assert capsys.readouterr().out.count("done earlier") == len(STAGES)
