"""Train one ranking model on Ray Train, log it to MLflow, register it through the gate.

  python -m jobs.train --config configs/small.yaml --model cdnet [--data DIR] [--params '{"topk_ratio": 0.2}']

Runs the ingest first when DIR holds no processed data. Ranking models: cdnet, dlf, dcnv2,
din, mean_pool, lrea, sim_hard, adaf2m2:<base> (params {"base": {...}, "adaf2m2": {...}});
retrieval models: karma, two_tower, adaf2m2:two_tower. The registry gate compares test AUC
(ranking) or test HR@K (retrieval, K = train.retrieval_k).
Ends with one JSON line: the test metrics, the MLflow run and the registered version.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jobs.common import config_parser, init_ray, load


def train_and_register(cfg, data: Path, model_name: str, params: dict | None, tiny: bool = False) -> dict:
    """Ray Train fit → MLflow run → registry gate; returns the summary the CLI prints."""
    from training.loop import best_weights, fit
    from training.registry import log_run, register_with_gate
    from training.tasks import task_from_config

    task = task_from_config(model_name, data, cfg.train)
    run_name = f"{model_name.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = fit(cfg, str(data), model_name, params, name=run_name, tiny=tiny)
    if result.error is not None:
        raise RuntimeError(f"training {model_name} failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        weights = best_weights(d)
    model = task.build(model_name, params, tiny=tiny)
    model.load_state_dict(weights)
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    history = [{k: v for k, v in row.items() if not k.startswith("test_")} for row in history]
    final = {k: v for k, v in result.metrics.items() if k.startswith(("test_", "best_val_"))}
    run_id = log_run(cfg, model_name, params, history, final, data, model, task.spec, tiny=tiny)
    decision = register_with_gate(model_name, run_id, metric=f"test_{task.metric}",
                                  reevaluate=lambda uri: champion_on(task, uri, data, task.metric))
    return {"model": model_name, "run_id": run_id, "registered": decision["model"], "version": decision["version"],
            "challenger": decision["challenger"], "gate": decision["reason"], **final}


def champion_on(task, uri: str, data: Path, metric: str) -> float:
    """The registered model at `uri` scored on this data's test split (the gate's like-with-like
    comparison when the champion was tested on older data)."""
    from training.registry import load_model
    from training.tasks import evaluate_split

    return float(evaluate_split(task, load_model(uri), data, "test")[metric])


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__)
    p.add_argument("--model", required=True, help="model name (see above)")
    p.add_argument("--data", help="processed data folder (default: data.output of the config)")
    p.add_argument("--params", default="{}",
                   help="overrides of the model's config section (model.<name>) as JSON; unknown keys are errors")
    p.add_argument("--tiny", action="store_true", help="use the model's tiny preset (tests): model.preset=tiny")
    args = p.parse_args(argv)
    if args.tiny:
        args.overrides = [*(args.overrides or []), "model.preset=tiny"]
    cfg = load(args)
    try:
        overrides = json.loads(args.params) or None
    except json.JSONDecodeError as e:
        p.error(f"--params is not JSON: {e}")
    params = cfg.model.params_for(args.model, overrides)
    data = Path(args.data or cfg.data.output)
    from training.tasks import task_from_config

    if (data / "feature_spec.json").exists():  # fail fast on a bad name or params, before Ray starts
        task_from_config(args.model, data, cfg.train).build(args.model, params)
    init_ray()
    if not (data / "feature_spec.json").exists():
        import dataclasses

        from pipeline.ingest import run_ingest

        print(f"[train] no processed data in {data}: running the ingest first", flush=True)
        run_ingest(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, output=str(data))))
    print(json.dumps(train_and_register(cfg, data, args.model, params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
