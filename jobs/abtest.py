"""The simulated A/B against the served funnel; the report goes to MLflow.

  python -m jobs.abtest --config configs/small.yaml [--url http://127.0.0.1:8000]

Without --url the funnel is deployed first (Ray Serve on serve.host:serve.port). N
simulated users of the world (abtest.num_users, each abtest.requests_per_user requests)
call /recommend. Their traffic follows the world's own traffic model, as in the logs:
sessions start at random times of the A/B horizon and hold 1 + Poisson(requests per
session) requests, Exp(60 s) + 5 s apart; a user's requests go out in time order. The
world's click model decides the clicks, which go back through /feedback, one call per slate (so the next
request of the session sees them, as a served history does); the event log is then analysed
(serving/abtest.py): CTR and clicks per request per arm, the lift with a 95% CI, a
sample-ratio check, and the lift again with CUPED (each user's pre-test CTR in the logs as
covariate; `abtest.cuped`, which promotion then reads). Report (markdown + PNG) and numbers logged to MLflow; one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

from configs import FunnelConfig
from jobs.common import config_parser, init_ray, load


def deploy(cfg: FunnelConfig, data_dir: str | None = None) -> str:
    """Start Serve on 127.0.0.1 (by default) and deploy the funnel; returns its URL."""
    from ray import serve

    from serving.app import args_from_config, build_app
    from serving.guard import TOKEN_ENV, ensure_token_file

    if not os.environ.get(TOKEN_ENV):
        ensure_token_file(cfg.serve.token_file)  # a random token, mode 0600, if there is none yet
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(args_from_config(cfg, data_dir)), name="funnel", route_prefix="/")
    return served_url(cfg)


def served_url(cfg: FunnelConfig, via: str = "direct") -> str:
    """Where the funnel answers: with Serve's direct ingress on (jobs.common.serve_startup_env), the
    ingress replica's own port; else (or `via="proxy"`) the proxy on serve.host:serve.port.
    The replica's port comes from the Serve controller's target groups (what a load balancer in
    front of direct-ingress replicas reads; Ray has no public call for it yet)."""
    proxy = f"http://{cfg.serve.host}:{cfg.serve.port}"
    if via == "proxy":
        return proxy
    try:
        import ray
        from ray.serve.context import _get_global_client

        groups = ray.get(_get_global_client()._controller.get_target_groups.remote("funnel"), timeout=30)
        ports = [t.port for g in groups if g.protocol.value == "HTTP" for t in g.targets]
    except Exception as e:  # an older Ray or no controller: the proxy
        print(f"[deploy] no direct-ingress target ({type(e).__name__}: {e}); using the proxy", flush=True)
        return proxy
    return f"http://{cfg.serve.host}:{ports[0]}" if ports else proxy


def schedule(world, n: int, rng: np.random.Generator, horizon: tuple[int, int] | None = None) -> np.ndarray:
    """(n,) request times of one user, sorted: sessions as in the logs (pipeline/simulator.py) —
    a uniform start in the A/B horizon (default the world's, right after the log; jobs.loop moves it
    on each round), 1 + Poisson(requests_per_session) requests, gaps of Exp(60 s) + 5 s — until n
    requests; all inside the horizon."""
    start, end = horizon or (world.log_end_ts, world.ab_end_ts)
    sizes = 1 + rng.poisson(world.cfg.requests_per_session, size=n)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    sizes[-1] -= int(sizes.sum()) - n
    starts = np.repeat(rng.integers(start, end - 3600, size=len(sizes)), sizes)
    gaps = rng.exponential(60.0, size=n).astype(np.int64) + 5
    cs = np.cumsum(gaps)
    within = cs - cs[np.repeat(np.cumsum(sizes) - sizes, sizes)]  # seconds since the session's first request
    return np.sort(starts + within)


def simulate(cfg: FunnelConfig, url: str, horizon: tuple[int, int] | None = None) -> dict[str, Any]:
    """Drive the world's users against `url` inside `horizon` (`schedule`); returns how many
    requests/clicks were sent."""
    from pipeline.world import get_world
    from serving.guard import read_token

    world = get_world(cfg.world)
    ab = cfg.abtest
    auth = {"Authorization": f"Bearer {read_token(cfg.serve.token_file)}"}
    rng = np.random.default_rng(ab.seed)
    users = world.users_table()
    known = users[users["registered_ts"] < world.log_end_ts]["user_id"].to_numpy()
    chosen = rng.choice(known, size=min(ab.num_users, len(known)), replace=False)
    jobs = [(str(u), schedule(world, ab.requests_per_user, rng, horizon), int(rng.integers(0, 2**31))) for u in chosen]
    http = requests.Session()
    errors: list[str] = []
    bar = tqdm(total=len(chosen) * ab.requests_per_user, desc="A/B requests", unit="req",
               disable=not sys.stderr.isatty())

    sent: list[int] = []  # one entry per request (list.append is atomic across threads)
    served: list[str] = []  # the request ids this A/B was served: its rows of the event log

    def one(user: str, ts: int, click_rng: np.random.Generator) -> int:
        r = http.post(f"{url}/recommend", json={"user_id": user, "k": ab.slate_size, "ts": ts}, timeout=120)
        sent.append(1)
        bar.update()
        if r.status_code != 200:
            errors.append(f"{r.status_code} {r.text[:200]}")
            return 0
        rec = r.json()
        served.append(rec["request_id"])
        items = np.array([int(i) for i in rec["items"]])
        pos = np.arange(len(items))
        clicked = world.sample_clicks(np.full(len(items), int(user)), items, pos, np.full(len(items), ts), click_rng)
        if clicked.any():  # one call per slate with all its clicks
            http.post(f"{url}/feedback", json={"user_id": user, "request_id": rec["request_id"],
                                               "ts": ts, "clicks": [{"item_id": rec["items"][p], "position": int(p)}
                                                                    for p in pos[clicked]]},
                      headers=auth, timeout=120).raise_for_status()
        return int(clicked.sum())

    def user_requests(job: tuple[str, np.ndarray, int]) -> int:
        user, times, seed = job  # in time order: each request sees the clicks fed back before it
        click_rng = np.random.default_rng(seed)
        return sum(one(user, int(ts), click_rng) for ts in times)

    with ThreadPoolExecutor(ab.concurrency) as pool:
        clicks = sum(pool.map(user_requests, jobs))
    bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(sent)} A/B requests failed; first: {errors[0]}")
    http.post(f"{url}/flush", headers=auth, timeout=120).raise_for_status()
    return {"requests": len(sent), "clicks": clicks, "users": len(chosen), "request_ids": served}


def served_versions(events, arm: str) -> dict[str, Any]:
    """The model versions that served `arm`, from its logged exposures (never from the alias,
    which may have moved during the test): `treatment_version_sets` lists every distinct set;
    `treatment_versions` is {registered name: version} when exactly one set served throughout,
    else {} (promotion then refuses)."""
    imp = events[(events["event"] == "impression") & (events["arm"] == arm)]
    sets = sorted({str(v) for v in imp["model_versions"].fillna("")}) if "model_versions" in imp else []
    one = {}
    if len(sets) == 1 and sets[0]:
        one = dict(x.rsplit("/", 1) for x in sets[0].split(","))
    return {"treatment_version_sets": sets, "treatment_versions": one}


def run_abtest(cfg: FunnelConfig, url: str | None = None, data_dir: str | None = None,
               horizon: tuple[int, int] | None = None) -> dict[str, Any]:
    """The A/B (`simulate` inside `horizon`), its analysis, report and MLflow run; `res["request_ids"]`
    names this test's rows of the event log."""
    import mlflow

    from serving.abtest import analyse, plot, pre_period_ctr, report_markdown
    from serving.router import read_events
    from training.registry import setup_tracking

    log_dir = Path(cfg.serve.event_log)
    url = url or deploy(cfg, data_dir)
    t0 = time.time()
    sent = simulate(cfg, url, horizon)
    # this test's rows only; the log keeps every earlier one (served traffic is training data)
    request_ids = sent.pop("request_ids")
    events = read_events(log_dir)
    events = events[events["request_id"].isin(set(request_ids))].reset_index(drop=True)
    arms = list(cfg.abtest.arms)
    control = next((a for a in arms if cfg.abtest.variants.get(a) == "popularity"), arms[0])
    treatment = next(a for a in arms if a != control)
    covariate = pre_period_ctr(data_dir or cfg.data.output) if cfg.abtest.cuped else None
    res = analyse(events, cfg.abtest.arms, control, treatment, cfg.abtest.alpha, covariate=covariate)
    res |= {"sent": sent, "seconds": time.time() - t0, "variants": cfg.abtest.variants}
    exp = setup_tracking(cfg.tracking)
    res |= served_versions(events, treatment)
    versions = res["treatment_versions"]
    md = report_markdown(res)
    out = Path("runs") / "abtest"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d, mlflow.start_run(experiment_id=exp, run_name="abtest") as run:
        (Path(d) / "abtest.md").write_text(md)
        (Path(d) / "abtest.json").write_text(json.dumps(res, indent=2, default=str))
        plot(res, events, Path(d) / "abtest.png")
        mlflow.log_artifacts(d)
        shutil.copyfile(Path(d) / "abtest.png", out / "last.png")  # the same report, kept beside the run
        for a, s in res["arms"].items():
            mlflow.log_metrics({f"{a}_ctr": s["ctr"], f"{a}_clicks_per_request": s["clicks_per_request"],
                                f"{a}_users": s["users"]})
        if res["lift"]:
            mlflow.log_metrics({f"lift_{k}": v for k, v in res["lift"].items()})
        if res["lift_cuped"]:
            mlflow.log_metrics({f"lift_cuped_{k}": v for k, v in res["lift_cuped"].items()})
        mlflow.set_tags({"srm_mismatch": str(res["srm"]["mismatch"]), "variants": json.dumps(cfg.abtest.variants),
                         **{f"version.{k}": v for k, v in versions.items()}})
        res["run_id"] = run.info.run_id
    (out / "last.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "last.md").write_text(md)
    print(md, flush=True)
    return res | {"request_ids": request_ids}


def main(argv: list[str] | None = None) -> int:
    p = config_parser(__doc__)
    p.add_argument("--url", help="a running funnel (default: deploy one)")
    p.add_argument("--data", help="processed data folder (default: data.output)")
    args = p.parse_args(argv)
    cfg = load(args)
    init_ray()
    res = run_abtest(cfg, args.url, args.data)
    print(json.dumps({"lift": res["lift"], "lift_cuped": res["lift_cuped"], "significant_positive": res["significant_positive"],
                      "srm_mismatch": res["srm"]["mismatch"], "run_id": res["run_id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
