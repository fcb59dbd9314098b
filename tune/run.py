"""Ray Tune over the training entry point: ASHA + Optuna, each trial a Ray Train fit.

Tune over Train V2 (STACK.md): a driver function per trial builds and fits the trainer
(training.loop.fit, unchanged) with `TuneReportCallback`, so every epoch's val metrics
reach Tune and ASHA can stop weak trials early; the driver itself asks for 0.01 CPU.
Each trial is also an MLflow run (MLflowLoggerCallback). Afterwards: a results table and
one plot of the metric against each knob, logged to MLflow, and the best trial's model
through the same registry gate as `jobs.train`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from configs import FunnelConfig
from tune.spaces import knobs, space, to_params


def metric_names(model: str, cfg: FunnelConfig) -> tuple[str, str]:
    """(val metric Tune optimises, test metric the registry gate compares): AUC for ranking
    models, HR@K for retrieval models."""
    from training.tasks import is_retrieval

    m = f"hr_{cfg.train.retrieval_k}" if is_retrieval(model) else "auc"
    return f"val_{m}", f"test_{m}"


def _driver(trial: dict[str, Any]) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.loop import fit

    cfg: FunnelConfig = trial["cfg"]  # train.cpus_per_worker already shared out (run_tune)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=float(trial["lr"])))
    params = to_params(trial, trial.get("base_params"))
    fit(cfg, trial["data_dir"], trial["model"], params, name=f"trial-{trial['trial_tag']}",
        callbacks=[TuneReportCallback()], storage_path=trial["storage"])


def trial_resources(cfg: FunnelConfig) -> tuple[int, float]:
    """(trials at once, CPU per train worker): `tune.max_concurrent` trials, each worker's CPU
    lowered so that one whole CPU stays free for the Ray Data tasks that feed them
    (training.loop.cpu_share; the trial's driver holds 0.01 CPU)."""
    import ray

    from training.loop import cpu_share

    n = max(1, cfg.tune.max_concurrent)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return n, cpu_share(cfg.train.cpus_per_worker, n * cfg.train.num_workers, cpus - 0.01 * n)


def run_tune(cfg: FunnelConfig, data_dir: str, model: str, num_samples: int,
             base_params: dict | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Returns the results table (one row per trial) and the best trial's summary."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from training.registry import setup_tracking

    setup_tracking(cfg.tracking)
    import mlflow

    t = cfg.train  # the trials' budget: tune.epochs / tune.max_train_rows where set
    concurrent, share = trial_resources(cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        t, epochs=cfg.tune.epochs or t.epochs, max_train_rows=cfg.tune.max_train_rows or t.max_train_rows,
        max_val_rows=cfg.tune.max_eval_rows or t.max_val_rows, max_test_rows=cfg.tune.max_eval_rows or t.max_test_rows,
        cpus_per_worker=share))
    metric, test_metric = metric_names(model, cfg)
    storage = str((Path(cfg.train.storage_path) / "tune").resolve())
    param_space = {**space(model), "cfg": cfg, "data_dir": str(Path(data_dir).resolve()), "model": model,
                   "base_params": base_params or {}, "storage": storage,
                   "trial_tag": tune.sample_from(lambda _: __import__("uuid").uuid4().hex[:8])}
    tuner = tune.Tuner(
        tune.with_resources(_driver, {"cpu": 0.01}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=num_samples, max_concurrent_trials=concurrent,
            scheduler=ASHAScheduler(time_attr="epoch", grace_period=cfg.tune.grace_period, max_t=max(cfg.train.epochs, 1)),
            search_alg=OptunaSearch(seed=cfg.train.seed),
        ),
        run_config=tune.RunConfig(
            name=f"tune-{model.replace(':', '-')}", storage_path=storage,
            callbacks=[MLflowLoggerCallback(tracking_uri=mlflow.get_tracking_uri(),
                                            experiment_name=cfg.tracking.experiment + "-tune", save_artifact=False)],
        ),
    )
    grid = tuner.fit()
    rows = []
    for r in grid:
        if r.metrics is None:
            continue
        row = {k: r.config[k] for k in ("lr", *knobs(model))}
        row |= {k: r.metrics.get(k) for k in (metric, "epoch", test_metric, "checkpoint_path")}
        row["error"] = str(r.error) if r.error else ""
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(metric, ascending=False, na_position="last").reset_index(drop=True)
    best = table.iloc[0].to_dict() if len(table) else {}
    return table, best


def plot_knobs(table: pd.DataFrame, model: str, path: Path, metric: str = "val_auc") -> Path:
    """One panel per knob: the val metric of each trial against the knob's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["lr", *knobs(model)]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.2), squeeze=False)
    for ax, c in zip(axes[0], cols, strict=True):
        ax.scatter(table[c], table[metric], s=30)
        ax.set_xlabel(c.removeprefix("params."))
        ax.set_ylabel(metric)
        if c == "lr" or c.endswith(".lam"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Tune: {model} ({len(table)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(cfg: FunnelConfig, data_dir: str, model: str, table: pd.DataFrame, best: dict[str, Any],
           base_params: dict | None = None) -> dict[str, Any]:
    """Log the table and plot to MLflow; send the best trial's model through the registry gate."""
    import mlflow

    from training.loop import best_weights
    from training.registry import log_run, register_with_gate, setup_tracking
    from training.tasks import task_from_config

    metric, test_metric = metric_names(model, cfg)
    exp = setup_tracking(cfg.tracking)
    with tempfile.TemporaryDirectory() as d, mlflow.start_run(experiment_id=exp, run_name=f"tune-{model}"):
        table.to_csv(Path(d) / "tune_results.csv", index=False)
        mlflow.log_artifact(str(Path(d) / "tune_results.csv"))
        mlflow.log_artifact(str(plot_knobs(table, model, Path(d) / "tune_knobs.png", metric)))
        mlflow.log_params({"model": model, "num_trials": len(table)})
        mlflow.log_metric(f"best_{metric}", float(best[metric]))
    task = task_from_config(model, data_dir, cfg.train)
    params = to_params(best, base_params)
    net = task.build(model, params)
    net.load_state_dict(best_weights(best["checkpoint_path"]))
    final = {k: float(best[k]) for k in (test_metric,) if best.get(k) is not None}
    if final and (cfg.tune.max_eval_rows or cfg.train.max_test_rows):
        # the trials were tested on a sample: the gate compares on the whole test split, as jobs.train does
        from training.tasks import evaluate_split

        final = {test_metric: evaluate_split(task, net, data_dir, "test", cfg.train.batch_size)[test_metric.removeprefix("test_")]}
    tuned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=float(best["lr"])))
    run_id = log_run(tuned, model, params, [], final | {f"best_{metric}": float(best[metric])}, data_dir, net,
                     task.spec)
    from jobs.train import champion_on

    decision = (register_with_gate(model, run_id, metric=test_metric,
                                   reevaluate=lambda uri: champion_on(task, uri, Path(data_dir), task.metric))
                if test_metric in final
                else {"challenger": False, "reason": "best trial has no test metrics"})
    return {"best": {k: v for k, v in best.items() if k != "checkpoint_path"}, "run_id": run_id, **decision}


def summary_json(out: dict[str, Any]) -> str:
    return json.dumps(out, default=str)
