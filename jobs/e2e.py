"""End to end, resumable by stage: `make demo` runs this on configs/small.yaml.

  python -m jobs.e2e --config configs/small.yaml [--from STAGE] [--only STAGE]
  ray job submit --working-dir . -- python -m jobs.e2e --config configs/small.yaml

Stages run in order; each writes a marker under runs/e2e/<config>/ so a re-run
resumes after the last completed stage (`--from` forces a restart there).
Today the pipeline has one stage, ingest; training, tuning, indexing, serving,
the A/B and promotion are added as stages here when they land.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from configs import FunnelConfig
from jobs.common import config_parser, init_ray, load


def stage_ingest(cfg: FunnelConfig) -> dict:
    from jobs.ingest import summary
    from pipeline.ingest import run_ingest

    t0 = time.time()
    stats = run_ingest(cfg)
    print(summary(stats, cfg.data.output, time.time() - t0))
    return {"fingerprint": stats["fingerprint"], "output": cfg.data.output}


STAGES: dict[str, Callable[[FunnelConfig], dict]] = {"ingest": stage_ingest}


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__)
    p.add_argument("--from", dest="start", choices=list(STAGES), help="re-run from this stage")
    p.add_argument("--only", choices=list(STAGES), help="run just this stage")
    args = p.parse_args(argv)
    cfg = load(args)
    state_dir = Path("runs") / "e2e" / Path(args.config).stem
    state_dir.mkdir(parents=True, exist_ok=True)
    names = list(STAGES)
    todo = [args.only] if args.only else names[names.index(args.start):] if args.start else names
    init_ray()
    for name in todo:
        marker = state_dir / f"{name}.json"
        if marker.exists() and not (args.only or args.start):
            print(f"[e2e] {name}: done earlier ({marker}); skipping (use --from {name} to redo)")
            continue
        print(f"[e2e] {name} ...", flush=True)
        result = STAGES[name](cfg)
        marker.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[e2e] finished: {', '.join(todo)}. Outputs: {cfg.data.output}/ (stats.json, feature_spec.json, rejects/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
