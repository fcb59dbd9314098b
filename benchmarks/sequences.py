"""Sequence storage: one click timeline per user + a cut-off per example, against
materialising the L-long history in every example.

  python -m benchmarks.sequences --data data/processed/small [--lengths 200 1000]

Measures, on a real ingest output: bytes on disk of both layouts (the
materialised one written for a sample of rows and scaled), and the cost the
timeline layout moves to batch time (gathering B=4096 histories).
Prints a table and writes benchmarks/out/sequences.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.history import HistoryStore


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.parquet"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/processed/small")
    ap.add_argument("--lengths", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--sample", type=int, default=100_000)
    args = ap.parse_args(argv)
    root = Path(args.data)
    ranking = pd.read_parquet(root / "ranking", columns=["user_key", "hist_end"])
    n = len(ranking)
    hs = HistoryStore.load(root)
    timeline_bytes = _dir_bytes(root / "clicks")
    cutoff_bytes = n * 8  # one int64 per example (hist_end), in memory
    rng = np.random.default_rng(0)
    sample = ranking.iloc[rng.choice(n, size=min(args.sample, n), replace=False)]
    rows = []
    for L in args.lengths:
        g = hs.gather(sample["user_key"].to_numpy(), sample["hist_end"].to_numpy(), L)
        table = pa.table({f: pa.FixedSizeListArray.from_arrays(pa.array(g[f].astype(np.int32).ravel()), L)
                          for f in ("item_idx", "cat_idx", "brand_idx")})
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(table, Path(tmp) / "s.parquet")
            mat_disk = (Path(tmp) / "s.parquet").stat().st_size * n / len(sample)
        mat_mem = n * L * 3 * 4  # int32, in memory / in a batch pipeline
        B = 4096
        uk, he = ranking["user_key"].to_numpy()[:B], ranking["hist_end"].to_numpy()[:B]
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            hs.gather(uk, he, L)
        gather_s = (time.perf_counter() - t0) / reps
        rows.append({"L": L, "examples": n, "materialised_disk_bytes": int(mat_disk), "materialised_mem_bytes": mat_mem,
                     "timeline_disk_bytes": timeline_bytes, "timeline_mem_bytes": int(hs.item_key.nbytes * 2 + cutoff_bytes),
                     "gather_ms_per_4096": gather_s * 1e3, "gather_rows_per_s": B / gather_s})
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "command": "python -m benchmarks.sequences " + " ".join(argv or sys.argv[1:]), "data": str(root), "rows": rows}
    Path("benchmarks/out").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/out/sequences.json").write_text(json.dumps(out, indent=2))
    mib = 2**20
    print(f"{'L':>6}{'examples':>10}{'mat. disk MiB':>15}{'mat. mem MiB':>14}{'timeline disk MiB':>19}"
          f"{'timeline mem MiB':>18}{'gather ms/4096':>16}")
    for r in rows:
        print(f"{r['L']:>6}{r['examples']:>10,}{r['materialised_disk_bytes'] / mib:>15.1f}{r['materialised_mem_bytes'] / mib:>14.0f}"
              f"{r['timeline_disk_bytes'] / mib:>19.1f}{r['timeline_mem_bytes'] / mib:>18.1f}{r['gather_ms_per_4096']:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
