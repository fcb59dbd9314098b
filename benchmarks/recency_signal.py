"""How much does a behavior's age say about a click, in the logs themselves?

  python -m benchmarks.recency_signal --data data/processed/small [--rows 100000] [--last 20]

For logged test impressions (sampled negatives left out) with a history, groups the rows by
when the user last clicked an item of the target's category (under 4 hours ago, 4–24 hours,
24 hours or more) or not at all among their last `--last` clicks, and prints each group's share and
logged CTR (writes JSON). The ground-truth world rewards the user's current short-term category
(pipeline/world.py), so a ranker that reads the behaviors' age has this much to gain offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd


def recency_groups(rows: pd.DataFrame, history, last: int) -> dict[str, dict[str, float]]:
    g = history.gather(rows["user_key"].to_numpy(), rows["hist_end"].to_numpy(), last)
    age_h = (rows["ts"].to_numpy()[:, None] - g["click_ts"]) / 3600.0
    valid = g["item_key"] > 0
    same = (g["cat_idx"] == rows["cat_idx"].to_numpy()[:, None]) & valid
    recent = (same & (age_h < 4)).any(1)
    mid = (same & (age_h < 24)).any(1) & ~recent
    old = same.any(1) & ~recent & ~mid
    groups = {"a same-category click under 4 h ago": recent,
              "the latest same-category click 4–24 h ago": mid,
              "same-category clicks only 24 h ago or more": old,
              f"no same-category click among the last {last}": ~same.any(1)}
    y = rows["label"].to_numpy()
    return {n: {"share": float(m.mean()), "ctr": float(y[m].mean()) if m.any() else float("nan"), "rows": int(m.sum())}
            for n, m in groups.items()}


def main(argv: list[str] | None = None) -> int:
    from pipeline.history import HistoryStore

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/processed/small")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--last", type=int, default=20)
    p.add_argument("--out", default="benchmarks/out/recency_signal.json")
    a = p.parse_args(argv)
    root = Path(a.data)
    if not (root / "ranking" / "split=test").exists():
        raise SystemExit(f"{root} holds no ranking/split=test: run the ingest first (python -m jobs.ingest ...)")
    rows = pd.read_parquet(root / "ranking" / "split=test")
    rows = rows[(rows["hist_end"] > 0) & ~rows["is_sampled_negative"].astype(bool)]
    rows = rows.sample(min(a.rows, len(rows)), random_state=0)
    out = recency_groups(rows, HistoryStore.load(root), a.last)
    w = max(len(n) for n in out) + 2
    print(f"{'test impressions with':<{w}}{'share':>8}{'logged CTR':>12}")
    for n, v in out.items():
        print(f"{n:<{w}}{v['share']:>8.3f}{v['ctr']:>12.4f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"data": str(root), "rows": len(rows), "groups": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
