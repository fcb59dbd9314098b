"""A 2-trial Tune smoke on the tiny world: ASHA + Optuna over CDNet's knobs, each trial a Ray Train fit."""

from __future__ import annotations

import dataclasses

import pytest

from tune.run import finish, run_tune
from tune.spaces import to_params

pytestmark = pytest.mark.ray


def test_to_params_nests_and_merges():
    got = to_params({"lr": 0.1, "params.topk_ratio": 0.3, "params.adaf2m2.alpha": 0.5}, {"adaf2m2": {"k": 3}})
    assert got == {"topk_ratio": 0.3, "adaf2m2": {"k": 3, "alpha": 0.5}}


@pytest.mark.slow  # the e2e smoke runs the same two-trial search as its tune stage (tests/e2e/served/)
def test_two_trial_tune_smoke(ray_session, tiny_cfg, tiny_processed, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(
        tiny_cfg,
        train=dataclasses.replace(tiny_cfg.train, epochs=1, batch_size=2048, storage_path=str(tmp_path / "ray")),
        tune=dataclasses.replace(tiny_cfg.tune, num_samples=2, max_concurrent=1, max_eval_rows=400),
    )
    base = {"embed_dim": 8, "sim_dim": 8, "layers": 1, "hidden": [16]}
    table, best = run_tune(cfg, str(tiny_processed), "cdnet", 2, base)
    assert len(table) == 2 and not table["error"].any()
    assert table["params.topk_ratio"].between(0.02, 1.0).all() and table["params.bins"].isin([5, 10, 20, 40]).all()
    assert best["val_auc"] == table["val_auc"].max()
    out = finish(cfg, str(tiny_processed), "cdnet", table, best, base)
    assert out["model"] == "funnel-cdnet" and out["challenger"]  # first version: no champion yet
    # trials were tested on a 400-row sample; the gate read the best model's AUC on the whole test split
    from training.registry import load_model
    from training.tasks import evaluate_split, task_from_config

    full = evaluate_split(task_from_config("cdnet", tiny_processed, cfg.train),
                          load_model(f"models:/funnel-cdnet/{out['version']}"), tiny_processed, "test")
    assert full["n"] > 1000
    assert mlflow.get_run(out["run_id"]).data.metrics["test_auc"] == pytest.approx(full["auc"], abs=1e-6)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment + "-tune"])
    assert len(runs) == 2  # one MLflow run per trial (MLflowLoggerCallback)
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(
        mlflow.search_runs(experiment_names=[cfg.tracking.experiment], filter_string="tags.`mlflow.runName` = 'tune-cdnet'").run_id[0])]
    assert {"tune_results.csv", "tune_knobs.png"} <= set(arts)
