"""The ranking stage in-process: ms per /rank request (rows + forward), eager against torch.compile.

  python -m benchmarks.rank_forward [--config configs/small.yaml] [--alias champion] [--users 50]
                                    [--candidates 100] [--compile]

Loads `funnel-<serve.ranker>@<alias>` from the registry and the processed data's FeatureStore, the
way a serving replica does. Then it ranks `--users` random users × `--candidates` random items, one
request per call (`serving.funnel.Ranker.rank_many`), on one thread, and reports the best of 2
passes. With `--compile`, the same model is also run after `torch.compile(dynamic=True)`. It reports
the first call's compile time, the seconds of the warm-up pass (recompiles), ms per request, and
whether the top-k agree with eager. A request's cost depends on its users' history lengths, so
compare rows of one run, never across data. Prints a table and writes
benchmarks/out/rank_forward.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

TS = 1_705_000_000  # the request time benchmarks/serve_load.py sends


def _pass(ranker, reqs) -> float:
    t = time.perf_counter()
    for q in reqs:
        ranker.rank_many([q])
    return (time.perf_counter() - t) / len(reqs) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--alias", default="champion")
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="also torch.compile(dynamic=True)")
    p.add_argument("--out", default="benchmarks/out/rank_forward.json")
    a = p.parse_args(argv)

    import torch

    from configs import load_config
    from serving.features import FeatureStore
    from serving.funnel import Ranker
    from training.registry import load_model, registered_name, setup_tracking

    torch.set_num_threads(1)
    cfg = load_config(a.config)
    setup_tracking(cfg.tracking)
    name = registered_name(cfg.serve.ranker)
    model = load_model(f"models:/{name}@{a.alias}").eval()
    store = FeatureStore(cfg.data.output)
    rng = np.random.default_rng(0)
    root = Path(cfg.data.output)
    n_users = len(pd.read_parquet(root / "users.parquet", columns=["user_id"]))
    n_items = len(pd.read_parquet(root / "items.parquet", columns=["item_id"]))
    reqs = []
    lengths = []
    for u in rng.integers(1, n_users + 1, a.users):
        hist, hts = store.user_history_ts(int(u))
        lengths.append(len(hist))
        cands = rng.choice(np.arange(1, n_items + 1), min(a.candidates, n_items), replace=False)
        reqs.append((int(u), hist, cands, 10, TS, hts))
    eager = Ranker(model, store)
    rows = [{"variant": "eager", "ms_per_request": min(_pass(eager, reqs) for _ in range(2))}]
    if a.compile:
        t = time.perf_counter()
        compiled = Ranker(torch.compile(model, dynamic=True), store)
        compiled.rank_many([reqs[0]])
        first = time.perf_counter() - t
        t = time.perf_counter()
        _pass(compiled, reqs)
        warm = time.perf_counter() - t
        same = all(np.array_equal(x.keys, y.keys) for x, y in
                   zip(eager.rank_many(reqs[:10]), compiled.rank_many(reqs[:10]), strict=True))
        rows.append({"variant": "torch.compile", "ms_per_request": min(_pass(compiled, reqs) for _ in range(2)),
                     "first_call_s": first, "warmup_pass_s": warm, "same_top_k": same})
        rows.append({"variant": "eager, again", "ms_per_request": min(_pass(eager, reqs) for _ in range(2))})
    base = rows[0]["ms_per_request"]
    print(f"{name}@{a.alias}: {a.users} users × {a.candidates} candidates, history length median "
          f"{int(np.median(lengths))}, p90 {int(np.percentile(lengths, 90))}; one thread")
    print(f"{'variant':<16}{'ms/request':>12}{'vs eager':>10}{'first call s':>14}{'warm-up s':>11}  same top-k")
    for r in rows:
        print(f"{r['variant']:<16}{r['ms_per_request']:>12.2f}{base / r['ms_per_request']:>9.2f}x"
              f"{r.get('first_call_s', float('nan')):>14.1f}{r.get('warmup_pass_s', float('nan')):>11.1f}  "
              f"{r.get('same_top_k', '')}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
                               "command": "python -m benchmarks.rank_forward " + " ".join(argv or sys.argv[1:]),
                               "model": f"{name}@{a.alias}", "rows": rows,
                               "history_len_median": float(np.median(lengths))}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
