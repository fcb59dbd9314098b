"""The served requests' work outside the models: id ↔ key lookups and the online state's update,
in µs per call, on the processed data's FeatureStore (what the ingress replica holds).

  python -m benchmarks.request_bookkeeping [--config configs/small.yaml] [--calls 2000]

Per /recommend request the ingress looks its user up twice (the request's user, and again to
record the slate), turns the slate's keys into ids, and records the exposures (counters and the
user's active days); per /rank request it looks up the user and the 100 candidates. Run it in two
checkouts alternately to compare a change (these machines are noisy: one run's rows are one
sitting). Prints a table and writes benchmarks/out/request_bookkeeping.json.
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


def _us(fn, calls: int) -> float:
    """Best of 5 rounds, µs per call."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", default="benchmarks/out/request_bookkeeping.json")
    a = p.parse_args(argv)

    from configs import load_config
    from serving.features import FeatureStore

    cfg = load_config(a.config)
    store = FeatureStore(cfg.data.output)
    root = Path(cfg.data.output)
    users = pd.read_parquet(root / "users.parquet", columns=["user_id"])["user_id"].astype(str).to_numpy()
    items = pd.read_parquet(root / "items.parquet", columns=["item_id"])["item_id"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    uid, slate_ids, cand_ids = str(rng.choice(users)), list(rng.choice(items, 10)), list(rng.choice(items, 100))
    slate = store.item_keys(slate_ids)
    u, ts = store.user_key(uid), int(store.state.as_of) + 3600
    rows = {
        "user_key (one user)": _us(lambda: store.user_key(uid), a.calls),
        "item_keys (10 ids)": _us(lambda: store.item_keys(slate_ids), a.calls),
        "item_keys (100 ids)": _us(lambda: store.item_keys(cand_ids), a.calls),
        "item_ids (10 keys)": _us(lambda: store.item_ids(slate), a.calls),
        "observe_exposures (a slate of 10)": _us(lambda: store.observe_exposures(u, slate, ts), a.calls),
    }
    rows["/rank: user_key + item_keys (100)"] = rows["user_key (one user)"] + rows["item_keys (100 ids)"]
    print(f"{'per call':<58}{'µs':>9}")
    for k, v in rows.items():
        print(f"{k:<58}{v:>9.1f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
                               "command": "python -m benchmarks.request_bookkeeping " + " ".join(argv or sys.argv[1:]),
                               "us_per_call": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
