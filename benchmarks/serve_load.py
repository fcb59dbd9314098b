"""Load test of the served funnel: p50/p99 latency and errors at rising QPS, open loop.

  python -m benchmarks.serve_load --config configs/small.yaml [--url URL] [--duration 60] [--warmup 10]
                                  [--rank-levels 25,50,100,150] [--recommend-levels 25,50,75]
                                  [--variants serve.colocate=true serve.colocate=false] [--via direct,proxy]

Needs registered models (run `make demo` first). Without --url the funnel is deployed
on 127.0.0.1 (Ray Serve, the config's replica CPUs). For /rank (100 candidates) and
/recommend (the whole funnel), requests are sent at a fixed rate — open loop: a slow
server does not slow the sender, so queueing shows up in the latency — for `--duration`
seconds per level, after `--warmup` seconds at the first level that are not measured; the
levels (`--rank-levels`, `--recommend-levels`; default: doubling from --start-qps) rise until
p99 passes 100 ms or a request fails. With --variants the funnel is redeployed once per
variant (each a comma-separated list of config overrides, e.g. `serve.colocate=false` or
`serve.max_batch_size=1,serve.colocate=false`) and the levels repeat, side by side in one run.
`--via` sends the same levels to each deployment's ingress replica directly (Serve's direct
ingress, on in Funnel's local clusters: jobs/common.py) and through Serve's HTTP proxy.
Where the time goes: each level also records the CPU seconds every process on the machine spent
during it (Linux /proc), per request, grouped as the ingress replica, the other Serve replicas
(stages), Serve's proxy, the load generator and the rest of Ray, and the ingress replica's full
(generation 2) garbage collections during it, from its /healthz (serving/pauses.py). The generator
freezes its own heap before each level, so its collector does not stall the sends it times.
Prints a table and the highest QPS with p99 < 100 ms and no errors per variant; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from configs import load_config
from jobs.common import init_ray

SLO_MS = 100.0
GROUPS = (("ingress", "ServeReplica:funnel:Funnel"), ("stages", "ServeReplica:funnel:"), ("proxy", "ProxyActor"),
          ("state actor", "StateActor"), ("state actor", "StateLog"))


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far per process group: the ingress replica, the stage
    replicas, Serve's proxy, this load generator, and everything else (Ray's daemons)."""
    import os

    out = dict.fromkeys([g for g, _ in GROUPS] + ["load generator", "rest"], 0.0)
    if not os.path.isdir("/proc"):
        return out
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            continue
        sec = (int(stat[11]) + int(stat[12])) / tick
        group = "load generator" if int(pid) == me else next((g for g, key in GROUPS if key in cmd), "rest")
        out[group] += sec
    return out


async def _level(urls: str | list[str], path: str, bodies: list[dict], qps: float, duration: float) -> dict:
    """One open-loop level; with several URLs (one per direct-ingress replica) request i goes to
    URL i mod n: the round robin of the L4 balancer a target group stands behind."""
    import aiohttp

    urls = [urls] if isinstance(urls, str) else urls
    lat: list[float] = []
    errors = 0
    first_error = ""
    n = int(qps * duration)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> None:
            nonlocal errors, first_error
            t0 = time.perf_counter()
            try:
                async with s.post(f"{urls[i % len(urls)]}{path}", json=bodies[i % len(bodies)]) as r:
                    body = await r.read()
                    if r.status != 200:
                        errors += 1
                        first_error = first_error or f"{r.status} {body[:200].decode(errors='replace')}"
                        return
            except (TimeoutError, aiohttp.ClientError) as e:
                errors += 1
                first_error = first_error or repr(e)
                return
            lat.append((time.perf_counter() - t0) * 1000)

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = start + i / qps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    a = np.array(lat) if lat else np.array([np.inf])
    return {"endpoint": path, "target_qps": qps, "achieved_qps": len(lat) / wall, "requests": n, "errors": errors,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "first_error": first_error}


def _health(url: str) -> dict:
    """The ingress replica's /healthz ({} if it does not answer, e.g. behind serve.auth_all, which the
    load's requests do not send a token for either)."""
    import requests

    try:
        return requests.get(f"{url}/healthz", timeout=10).json()
    except Exception:
        return {}


def _gc(url: str) -> dict:
    """The ingress replica's collector pauses so far (/healthz "gc")."""
    return _health(url).get("gc", {})


def _gc_cell(d: dict) -> str:
    """"2 × ≤331 ms" (full collections in the level × the longest), "0", or "?" when unknown."""
    if not d:
        return "?"
    return f"{d['gen2_collections']} × ≤{d['gen2_max_ms']:.0f} ms" if d["gen2_collections"] else "0"


def _gc_delta(before: dict, after: dict) -> dict:
    """Full (generation 2) collections of the ingress replica during a level: how many, their total
    and the longest (of the last 64 the replica keeps)."""
    b, a = before.get("gen2"), after.get("gen2")
    if not a or not b:
        return {}
    n = a["count"] - b["count"]
    new = after.get("recent_full_ms", [])[-n:] if n else []
    return {"gen2_collections": n, "gen2_ms": a["total_ms"] - b["total_ms"], "gen2_max_ms": max(new, default=0.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--url")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--start-qps", type=float, default=5.0)
    p.add_argument("--max-qps", type=float, default=640.0)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds at the first level before measuring")
    p.add_argument("--rank-levels", default="", help="comma-separated QPS levels of /rank (default: doubling)")
    p.add_argument("--recommend-levels", default="", help="comma-separated QPS levels of /recommend")
    p.add_argument("--variants", nargs="*", default=[],
                   help="deployments to compare, each comma-separated overrides such as serve.colocate=false")
    p.add_argument("--via", default="direct", help="comma-separated: direct (the ingress replica's port), proxy")
    p.add_argument("--out", default="benchmarks/out/serve_load.json")
    a = p.parse_args(argv)
    variants = a.variants or [""]
    vias = [v for v in a.via.split(",") if v]
    if not set(vias) <= {"direct", "proxy"}:
        p.error(f"--via takes direct and/or proxy, not {a.via!r}")
    if a.url and a.variants:
        p.error("--variants redeploys the funnel: not with --url")
    cfg = load_config(a.config)
    root = Path(cfg.data.output)
    users = pd.read_parquet(root / "users.parquet")["user_id"].astype(str).to_numpy()
    items = pd.read_parquet(root / "items.parquet")["item_id"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    ts = 1_705_000_000
    rank = [{"user_id": str(u), "candidates": rng.choice(items, 100, replace=False).tolist(), "k": 10, "ts": ts}
            for u in rng.choice(users, 500)]
    rec = [{"user_id": str(u), "k": 10, "ts": ts} for u in rng.choice(users, 500)]
    doubling = [a.start_qps * 2**i for i in range(64) if a.start_qps * 2**i <= a.max_qps]
    levels = {"/rank": [float(x) for x in a.rank_levels.split(",") if x] or doubling,
              "/recommend": [float(x) for x in a.recommend_levels.split(",") if x] or doubling}
    rows = []
    print(f"{'variant':<34} {'endpoint':<11} {'target':>7} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
          f"{'CPU ms/request: ingress':>8} {'stages':>7} {'proxy':>6} {'all':>6} {'ingress gen2 GC':>14}", flush=True)
    best: dict[str, float] = {}
    for variant in variants:
        urls = {"given": a.url} if a.url else {}
        if not a.url:
            from serving.deploy import deploy, served_urls

            init_ray()
            vcfg = load_config(a.config, [o for o in variant.split(",") if o])
            deploy(vcfg)
            urls = {via: served_urls(vcfg, via) for via in vias}  # direct: every ingress replica's port
        for via, url in urls.items():
            name = ",".join(x for x in (variant, f"via {via}") if x)
            first = url if isinstance(url, str) else url[0]  # its /healthz: the first replica's collector
            loop = {True: "a thread of its own", False: "the HTTP loop"}.get(_health(first).get("user_code_thread"), "?")
            print(f"# {name}: {url} (the funnel's code runs on {loop})", flush=True)
            for path, bodies in (("/rank", rank), ("/recommend", rec)):
                if a.warmup > 0:  # first requests load lazily built state (caches, batch queues): not measured
                    asyncio.run(_level(url, path, bodies, levels[path][0], a.warmup))
                for qps in levels[path]:
                    gc.collect()
                    gc.freeze()  # the generator's own heap out of its collector: its pauses are not the server's
                    g0, before = _gc(first), _cpu_seconds()
                    r = asyncio.run(_level(url, path, bodies, qps, a.duration)) | {"variant": name}
                    after, g1 = _cpu_seconds(), _gc(first)
                    r["cpu_ms_per_request"] = {g: 1000 * (after[g] - before[g]) / max(1, r["requests"]) for g in after}
                    r["ingress_gc"] = _gc_delta(g0, g1)
                    rows.append(r)
                    c = r["cpu_ms_per_request"]
                    print(f"{name:<34} {path:<11} {qps:>7g} {r['achieved_qps']:>9.1f} {r['p50_ms']:>8.1f} "
                          f"{r['p99_ms']:>8.1f} {r['errors']:>7} {c['ingress']:>8.1f} {c['stages']:>7.1f} "
                          f"{c['proxy']:>6.1f} {sum(c.values()):>6.1f} {_gc_cell(r['ingress_gc']):>14}", flush=True)
                    if r["errors"]:
                        print(f"  first error: {r['first_error']}", flush=True)
                    if r["p99_ms"] >= SLO_MS or r["errors"]:
                        break
                    best[f"{path} {name}"] = qps
        if not a.url:
            from ray import serve

            serve.shutdown()  # the next variant deploys from scratch
    for key in sorted({r["variant"] for r in rows}):
        for path in ("/rank", "/recommend"):
            print(f"highest QPS with p99 < {SLO_MS:.0f} ms and no errors, {path}, {key}: "
                  f"{best.get(f'{path} {key}', 'none')}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"levels": rows, "best_qps": best, "slo_ms": SLO_MS}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
