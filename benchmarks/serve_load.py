"""Load test of the served funnel: p50/p99 latency and errors at rising QPS, open loop.

  python -m benchmarks.serve_load --config configs/small.yaml [--url URL] [--duration 60]
                                  [--batch-sizes 16,1] [--warmup 10]

Needs registered models (run `make demo` first). Without --url the funnel is deployed
on 127.0.0.1 (Ray Serve, the config's replica CPUs). For /rank (100 candidates) and
/recommend (the whole funnel), requests are sent at a fixed rate — open loop: a slow
server does not slow the sender, so queueing shows up in the latency — for `--duration`
seconds per level, after `--warmup` seconds at the first level that are not measured; levels
double until p99 passes 100 ms or a request fails. With
--batch-sizes the funnel is redeployed once per `serve.max_batch_size` (`@serve.batch` of
the retriever and ranker; 1 = off) and the levels repeat, side by side in one run. Prints
a table and the highest QPS with p99 < 100 ms and no errors; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from configs import load_config
from jobs.common import init_ray

SLO_MS = 100.0


async def _level(url: str, path: str, bodies: list[dict], qps: float, duration: float) -> dict:
    import aiohttp

    lat: list[float] = []
    errors = 0
    n = int(qps * duration)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with s.post(f"{url}{path}", json=bodies[i % len(bodies)]) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except (TimeoutError, aiohttp.ClientError):
                errors += 1
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
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--url")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--start-qps", type=float, default=5.0)
    p.add_argument("--max-qps", type=float, default=640.0)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds at the first level before measuring")
    p.add_argument("--batch-sizes", default="", help="comma-separated serve.max_batch_size values to compare")
    p.add_argument("--out", default="benchmarks/out/serve_load.json")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    sizes = [int(x) for x in a.batch_sizes.split(",") if x] or [cfg.serve.max_batch_size]
    if a.url and len(sizes) > 1:
        p.error("--batch-sizes redeploys the funnel: not with --url")
    root = Path(cfg.data.output)
    users = pd.read_parquet(root / "users.parquet")["user_id"].astype(str).to_numpy()
    items = pd.read_parquet(root / "items.parquet")["item_id"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    ts = 1_705_000_000
    rank = [{"user_id": str(u), "candidates": rng.choice(items, 100, replace=False).tolist(), "k": 10, "ts": ts}
            for u in rng.choice(users, 500)]
    rec = [{"user_id": str(u), "k": 10, "ts": ts} for u in rng.choice(users, 500)]
    rows = []
    print(f"{'batch':>5} {'endpoint':<11} {'target':>7} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}",
          flush=True)
    best: dict[str, float] = {}
    for size in sizes:
        url = a.url
        if not url:
            import dataclasses

            from jobs.abtest import deploy

            init_ray()
            url = deploy(dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, max_batch_size=size)))
        for path, bodies in (("/rank", rank), ("/recommend", rec)):
            if a.warmup > 0:  # first requests load lazily built state (caches, batch queues): not measured
                asyncio.run(_level(url, path, bodies, a.start_qps, a.warmup))
            qps = a.start_qps
            while qps <= a.max_qps:
                r = asyncio.run(_level(url, path, bodies, qps, a.duration)) | {"max_batch_size": size}
                rows.append(r)
                print(f"{size:>5} {path:<11} {qps:>7g} {r['achieved_qps']:>9.1f} {r['p50_ms']:>8.1f} "
                      f"{r['p99_ms']:>8.1f} {r['errors']:>7}", flush=True)
                if r["p99_ms"] >= SLO_MS or r["errors"]:
                    break
                best[f"{path} batch={size}"] = qps
                qps *= 2
    for size in sizes:
        for path in ("/rank", "/recommend"):
            print(f"highest QPS with p99 < {SLO_MS:.0f} ms and no errors, {path}, max_batch_size={size}: "
                  f"{best.get(f'{path} batch={size}', 'none tested')}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"levels": rows, "best_qps": best, "slo_ms": SLO_MS}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
