"""Tune a model's knobs with Ray Tune (ASHA + Optuna), each trial a Ray Train fit.

  python -m jobs.tune --config configs/small.yaml --model cdnet --num-samples 8
  python -m jobs.tune --model lrea --num-samples 8
  python -m jobs.tune --model adaf2m2:dcnv2 --num-samples 6

Knobs: CDNet top-k ratio [0.02, 1] and bins {5, 10, 20, 40}; LREA rank {8..128} and λ [0.01, 1];
AdaF2M2 α [0, 1]; plus the learning rate. Prints the results table and one JSON line; the
table and a plot of val AUC against each knob go to MLflow, the best model through the gate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.common import config_parser, init_ray, load


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--num-samples", type=int, help="trials (default: tune.num_samples of the config)")
    p.add_argument("--data", help="processed data folder (default: data.output of the config)")
    p.add_argument("--params", default="{}",
                   help="overrides of the model's config section (JSON); the knobs are searched over the result")
    args = p.parse_args(argv)
    cfg = load(args)
    data = Path(args.data or cfg.data.output)
    if not (data / "feature_spec.json").exists():
        p.error(f"{data} holds no processed data: run `python -m jobs.ingest --output {data}` (or jobs.train) first")
    from tune.run import finish, run_tune
    from tune.spaces import space

    space(args.model)  # an unknown model fails before Ray starts
    base = cfg.model.params_for(args.model, json.loads(args.params) or None)
    init_ray()
    table, best = run_tune(cfg, str(data), args.model, args.num_samples or cfg.tune.num_samples, base)
    print(table.drop(columns=["checkpoint_path"]).to_string(index=False))
    if not best or best.get("checkpoint_path") is None:
        raise RuntimeError("no trial finished with a checkpoint")
    print(json.dumps(finish(cfg, str(data), args.model, table, best, base), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
