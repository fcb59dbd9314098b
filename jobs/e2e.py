"""End to end, resumable by stage: `make demo` runs this on configs/small.yaml.

  python -m jobs.e2e --config configs/small.yaml [--from STAGE] [--only STAGE]
  ray job submit --working-dir . -- python -m jobs.e2e --config configs/small.yaml

Stages: ingest → train (the funnel's retriever, pre-ranker and ranker: Ray Train, MLflow,
registry gate → `challenger`) → tune (a small Ray Tune search of the ranker; its best
trial goes through the same gate) → index (FAISS over the retriever's item embeddings,
logged with its model version) → deploy (Ray Serve on 127.0.0.1) → abtest (simulated
users; report to MLflow) → promote (`champion` moves on a significant positive lift).

Each stage writes a marker under runs/e2e/<config>/ so a re-run resumes after the last
completed stage (`--from` forces a restart there). A marker carries a hash of the effective
config (the YAML with every `--set`): a stage whose config changed since it ran runs again,
and says which keys changed. The abtest stage deploys the funnel
itself when this process has not (a resumed run).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from configs import FunnelConfig, flatten, to_dict
from jobs.common import config_parser, init_ray, load


def stage_ingest(cfg: FunnelConfig) -> dict:
    from jobs.ingest import summary
    from pipeline.ingest import run_ingest

    t0 = time.time()
    stats = run_ingest(cfg)
    print(summary(stats, cfg.data.output, time.time() - t0))
    return {"fingerprint": stats["fingerprint"], "output": cfg.data.output}


def _funnel_models(cfg: FunnelConfig) -> list[str]:
    return [cfg.serve.retriever, cfg.serve.preranker, cfg.serve.ranker]


def stage_train(cfg: FunnelConfig, models: list[str] | None = None) -> dict:
    """The funnel's three models, `train.parallel_models` at a time, each fit a Ray Train run
    launched from a Ray task. Side by side they overlap each other's fixed costs (worker
    start-up, data, evaluation); compute itself does not scale on the 2-vCPU VM (7:45 vs 8:05
    one after another, benchmarks/RESULTS.md)."""
    from jobs.train import train_and_register

    models = models or _funnel_models(cfg)
    lanes = min(cfg.train.parallel_models, len(models))
    if lanes <= 1:
        out = {}
        for m in models:
            print(f"[e2e] train {m}", flush=True)
            out[m] = train_and_register(cfg, Path(cfg.data.output), m, cfg.model.params_for(m))
            print(f"[e2e]   {json.dumps(out[m])}", flush=True)
        return out
    import ray

    cfg = parallel_fit_config(cfg, lanes, ray.cluster_resources().get("CPU", 1.0))
    print(f"[e2e] train {', '.join(models)}: {lanes} at a time, {cfg.train.cpus_per_worker:.2f} CPU per worker",
          flush=True)
    fit_remote = ray.remote(num_cpus=0.01, max_retries=0)(train_and_register)
    pending = {fit_remote.remote(cfg, Path(cfg.data.output), m, cfg.model.params_for(m)): m for m in models[:lanes]}
    queue, out = list(models[lanes:]), {}
    while pending:
        [done], _ = ray.wait(list(pending))
        m = pending.pop(done)
        out[m] = ray.get(done)  # a failed fit raises here, naming its model
        print(f"[e2e]   {json.dumps(out[m])}", flush=True)
        if queue:
            nxt = queue.pop(0)
            pending[fit_remote.remote(cfg, Path(cfg.data.output), nxt, cfg.model.params_for(nxt))] = nxt
    return {m: out[m] for m in models}


def parallel_fit_config(cfg: FunnelConfig, lanes: int, cpus: float) -> FunnelConfig:
    """The config the parallel fits run with: paths made absolute (the fits run in Ray
    workers, whose working directory is not ours), the MLflow experiment created once here
    (not raced by the fits), and each worker's CPU share lowered so that one whole CPU stays
    free for the Ray Data tasks that feed them (without one, every fit waits forever)."""
    import dataclasses

    from training.loop import cpu_share
    from training.registry import is_uri, resolve_tracking_uri, setup_tracking

    setup_tracking(cfg.tracking)
    t, tr = cfg.train, cfg.tracking
    art = tr.artifact_location if is_uri(tr.artifact_location) else str(Path(tr.artifact_location).resolve())
    share = cpu_share(t.cpus_per_worker, lanes * t.num_workers, cpus)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, output=str(Path(cfg.data.output).resolve())),
        train=dataclasses.replace(t, cpus_per_worker=share, storage_path=str(Path(t.storage_path).resolve())),
        tracking=dataclasses.replace(tr, uri=resolve_tracking_uri(tr.uri), artifact_location=art))


def stage_tune(cfg: FunnelConfig) -> dict:
    from tune.run import finish, run_tune

    model = cfg.serve.ranker
    base = cfg.model.params_for(model)  # the knobs are searched over the model's config section
    table, best = run_tune(cfg, cfg.data.output, model, cfg.tune.num_samples, base)
    print(table.drop(columns=["checkpoint_path"], errors="ignore").to_string(index=False), flush=True)
    return finish(cfg, cfg.data.output, model, table, best, base)


def stage_index(cfg: FunnelConfig) -> dict:
    from serving.index_build import build_and_log_index

    return build_and_log_index(cfg, alias="challenger")


def stage_deploy(cfg: FunnelConfig) -> dict:
    from serving.deploy import deploy, served_url

    url = deploy(cfg)
    print(f"[e2e] the funnel answers at {url} (Serve's proxy: {served_url(cfg, 'proxy')})", flush=True)
    return {"url": url}


def stage_abtest(cfg: FunnelConfig) -> dict:
    from abtest.experiment import run_abtest
    from serving.deploy import deploy

    url = _running_url(cfg) or deploy(cfg)
    res = run_abtest(cfg, url)
    return {k: res[k] for k in ("lift", "lift_cuped", "decided_on", "significant_positive", "srm", "run_id", "arms")}


def stage_promote(cfg: FunnelConfig) -> dict:
    from abtest.promotion import promote

    res = promote(cfg, json.loads((Path("runs") / "abtest" / "last.json").read_text()))
    print(json.dumps(res), flush=True)
    return res


def _running_url(cfg: FunnelConfig) -> str | None:
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # Serve not started in this cluster
        return None
    from serving.deploy import served_url

    return served_url(cfg) if "funnel" in apps else None


def config_hash(flat: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_state(marker: Path, flat: dict) -> tuple[bool, str]:
    """(done, why): whether the stage's marker says it ran with this effective config
    (`flat`: the flattened config), and if not, why it runs."""
    if not marker.exists():
        return False, "not run yet"
    old = json.loads(marker.read_text())
    if old.get("config_hash") == config_hash(flat):
        return True, f"done earlier ({marker})"
    before = old.get("config") or {}
    if not before:
        return False, "its marker has no config hash (an earlier Funnel wrote it); running it again"
    changed = sorted(k for k in set(before) | set(flat) if str(before.get(k)) != str(flat.get(k)))
    shown = ", ".join(f"{k}: {before.get(k)!r} → {flat.get(k)!r}" for k in changed[:5])
    return False, f"the config changed since it ran ({shown}{', ...' if len(changed) > 5 else ''}); running it again"


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


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
    flat = flatten(to_dict(cfg))
    times: dict[str, float] = {}
    for name in todo:
        marker = state_dir / f"{name}.json"
        done, why = marker_state(marker, flat)
        if done and not (args.only or args.start):
            print(f"[e2e] {name}: {why}; skipping (use --from {name} to redo)")
            continue
        print(f"[e2e] {name} ... ({why})" if marker.exists() and not (args.only or args.start)
              else f"[e2e] {name} ...", flush=True)
        t0 = time.time()
        result = STAGES[name](cfg)
        times[name] = time.time() - t0
        marker.write_text(json.dumps({**result, "seconds": round(times[name], 1), "config_hash": config_hash(flat),
                                      "config": flat}, indent=2, default=str) + "\n")
    if times:
        print("[e2e] stage times: " + " · ".join(f"{k} {_mmss(v)}" for k, v in times.items())
              + f" · total {_mmss(sum(times.values()))}", flush=True)
    print(f"[e2e] finished: {', '.join(todo)}. Data: {cfg.data.output}/ · MLflow: {cfg.tracking.uri} "
          f"(mlflow ui --backend-store-uri {cfg.tracking.uri}) · A/B report: runs/abtest/last.md, last.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
