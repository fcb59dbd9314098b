"""The simulated A/B against the served funnel; the report goes to MLflow.

  python -m jobs.abtest --config configs/small.yaml [--url http://127.0.0.1:8000]

Without --url the funnel is deployed first (serving/deploy.py: Ray Serve on serve.host:serve.port).
The simulation, its analysis and the report are the abtest package's (abtest/experiment.py);
promotion is `python -m jobs.promote`. One JSON line.
"""

from __future__ import annotations

import json
import sys

from jobs.common import config_parser, init_ray, load


def main(argv: list[str] | None = None) -> int:
    from abtest.experiment import run_abtest
    from serving.deploy import deploy

    p = config_parser(__doc__)
    p.add_argument("--url", help="a running funnel (default: deploy one)")
    p.add_argument("--data", help="processed data folder (default: data.output)")
    args = p.parse_args(argv)
    cfg = load(args)
    init_ray()
    res = run_abtest(cfg, args.url or deploy(cfg, args.data), args.data)
    print(json.dumps({"lift": res["lift"], "lift_cuped": res["lift_cuped"], "significant_positive": res["significant_positive"],
                      "srm_mismatch": res["srm"]["mismatch"], "run_id": res["run_id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
