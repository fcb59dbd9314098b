"""End to end, resumable by stage: `make demo` runs this on configs/small.yaml.

  python -m jobs.e2e --config configs/small.yaml [--from STAGE] [--only STAGE]
  ray job submit --working-dir . -- python -m jobs.e2e --config configs/small.yaml

Stages: ingest → train (the funnel's retriever, pre-ranker and ranker: Ray Train, MLflow,
registry gate → `challenger`) → tune (a small Ray Tune search of the ranker; its best
trial goes through the same gate) → index (FAISS over the retriever's item embeddings,
logged with its model version) → deploy (Ray Serve on 127.0.0.1) → abtest (simulated
users; report to MLflow) → promote (`champion` moves on a significant positive lift).

Each stage writes a marker under runs/e2e/<config>/ so a re-run resumes after the last
completed stage (`--from` forces a restart there). The abtest stage deploys the funnel
itself when this process has not (a resumed run).
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


def _tiny(cfg: FunnelConfig) -> bool:
    return cfg.model.preset == "tiny"


def _funnel_models(cfg: FunnelConfig) -> list[str]:
    return [cfg.serve.retriever, cfg.serve.preranker, cfg.serve.ranker]


def stage_train(cfg: FunnelConfig) -> dict:
    from jobs.train import train_and_register

    out = {}
    for m in _funnel_models(cfg):
        print(f"[e2e] train {m}", flush=True)
        out[m] = train_and_register(cfg, Path(cfg.data.output), m, None, tiny=_tiny(cfg))
        print(f"[e2e]   {json.dumps(out[m])}", flush=True)
    return out


def stage_tune(cfg: FunnelConfig) -> dict:
    from tune.run import finish, run_tune

    model = cfg.serve.ranker
    table, best = run_tune(cfg, cfg.data.output, model, cfg.tune.num_samples)
    print(table.drop(columns=["checkpoint_path"], errors="ignore").to_string(index=False), flush=True)
    return finish(cfg, cfg.data.output, model, table, best)


def stage_index(cfg: FunnelConfig) -> dict:
    from serving.index_build import build_and_log_index

    return build_and_log_index(cfg, alias="challenger")


def stage_deploy(cfg: FunnelConfig) -> dict:
    from jobs.abtest import deploy

    return {"url": deploy(cfg)}


def stage_abtest(cfg: FunnelConfig) -> dict:
    from jobs.abtest import deploy, run_abtest

    url = _running_url(cfg) or deploy(cfg)
    res = run_abtest(cfg, url)
    return {k: res[k] for k in ("lift", "significant_positive", "srm", "run_id", "arms")}


def stage_promote(cfg: FunnelConfig) -> dict:
    from jobs.promote import promote

    res = promote(cfg, json.loads((Path("runs") / "abtest" / "last.json").read_text()))
    print(json.dumps(res), flush=True)
    return res


def _running_url(cfg: FunnelConfig) -> str | None:
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # Serve not started in this cluster
        return None
    return f"http://{cfg.serve.host}:{cfg.serve.port}" if "funnel" in apps else None


STAGES: dict[str, Callable[[FunnelConfig], dict]] = {
    "ingest": stage_ingest, "train": stage_train, "tune": stage_tune, "index": stage_index,
    "deploy": stage_deploy, "abtest": stage_abtest, "promote": stage_promote,
}


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
    print(f"[e2e] finished: {', '.join(todo)}. Data: {cfg.data.output}/ · MLflow: {cfg.tracking.uri} "
          f"(mlflow ui --backend-store-uri {cfg.tracking.uri}) · A/B report: runs/abtest/last.md, last.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
