"""Serving latency of long-sequence scoring: 500 candidates for one user.

  python -m benchmarks.lrea_serving [--lengths 100 1000 10000] [--candidates 500] [--reps 20]

Per L, median latency (ms) of:
  lrea_cached   LREA's absorbed path (eq. 9), the per-user cache built beforehand (off the request)
  lrea_absorb   LREA's absorbed path with the cache built inside the request
  din_long      DIN target attention over all L behaviors (candidates in chunks of 50 to bound memory)
  sim_hard      SIM hard search (k = 50 same-category behaviors) + DIN attention over them
Ratios against LREA cached at the shortest L and against DIN at the same L.
Pure PyTorch under inference_mode; CPU, plus CUDA when present. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from models.din import DIN, DINConfig
from models.layers import Embedded
from models.lrea import LREA, LREAConfig
from models.sim_hard import SIMHard, SIMHardConfig
from models.spec import FeatureSpec

D = 16


def spec_for(L: int) -> FeatureSpec:
    cats = {"user_idx": 100_000, "item_idx": 100_000, "cat_idx": 200, "brand_idx": 5_000, "u_age_idx": 8,
            "position": 16, "hour": 24}
    nums = {"user_clicks_before": "log1p", "item_clicks_before": "log1p", "user_active_days_7": "log1p",
            "user_active_days_30": "log1p", "item_ctr": "none"}
    return FeatureSpec(categorical=cats, numeric=nums, seq_len=L, short_len=min(20, L))


def request(spec: FeatureSpec, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = spec.seq_len
    hist = {f"hist_{f}": torch.randint(1, spec.categorical[f], (1, L), generator=g) for f in ("item_idx", "cat_idx", "brand_idx")}
    hist["hist_len"] = torch.tensor([L])
    cand = {c: torch.randint(1, v, (n,), generator=g) for c, v in spec.categorical.items()}
    cand["user_idx"][:] = cand["user_idx"][0]
    cand |= {c: torch.rand(n, generator=g) * 10 for c in spec.numeric}
    return ({k: v.to(device) for k, v in hist.items()}, {k: v.to(device) for k, v in cand.items()})


def with_history(model, hist: dict, cand: dict) -> Embedded:
    """Candidate fields plus the user's history embedded once and broadcast (no per-candidate copy)."""
    n = next(iter(cand.values())).shape[0]
    one = {**{k: v[:1] for k, v in cand.items()}, **hist}
    h = model.embedding(one)
    c = model.embedding({**cand, **{k: v[:, :1].expand(n, 1) if v.dim() == 2 else v[:1].expand(n) * 0 for k, v in hist.items()}})
    return Embedded(c.fields, h.seq.expand(n, -1, -1), h.seq_mask.expand(n, -1), c.target_index,
                    h.seq_cat.expand(n, -1), cand["cat_idx"])


def timed(fn, reps: int, device: str, warmup: int = 5) -> float:
    for _ in range(warmup):  # thread pools and kernel caches start cold on the first configuration
        fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def measure(device: str, L: int, n: int, reps: int) -> dict[str, float]:
    """Median ms of each method for one history length."""
    spec = spec_for(L)
    torch.manual_seed(0)
    lrea = LREA(spec, LREAConfig(embed_dim=D, rank=32, attention_hidden=64)).to(device).eval()
    din = DIN(spec, DINConfig(embed_dim=D, sequence="long")).to(device).eval()
    sim = SIMHard(spec, SIMHardConfig(embed_dim=D, k=50)).to(device).eval()
    hist, cand = request(spec, n, device)
    user_row = {**{k: v[:1] for k, v in cand.items()}, **hist}

    def din_all() -> torch.Tensor:
        emb = with_history(din, hist, cand)
        return torch.cat([
            din.interact(Embedded(emb.fields[i:i + 50], emb.seq[i:i + 50], emb.seq_mask[i:i + 50], emb.target_index,
                                  emb.seq_cat[i:i + 50], emb.target_cat[i:i + 50]))
            for i in range(0, n, 50)
        ])

    with torch.inference_mode():
        cache = lrea.absorb_batch(user_row)
        return {
            "lrea_cached": timed(lambda: lrea.score(cache, cand), reps, device),
            "lrea_absorb": timed(lambda: lrea.score(lrea.absorb_batch(user_row), cand), reps, device),
            "din_long": timed(din_all, max(3, reps // 4), device, warmup=1),
            "sim_hard": timed(lambda: sim.interact(with_history(sim, hist, cand)), reps, device),
        }


def run(device: str, lengths: list[int], n: int, reps: int) -> list[dict]:
    # The first configuration measured in a process runs ~2x slower whatever L is (seen:
    # L=10,000 first 5.9 ms, then L=100 2.8 ms): one discarded pass warms the process.
    measure(device, min(lengths), n, 3)
    rows = []
    for L in lengths:
        res = measure(device, L, n, reps)
        rows += [{"device": device, "L": L, "method": k, "ms": v, "candidates": n} for k, v in res.items()]
        print(f"  {device} L={L:<6} " + "  ".join(f"{k} {v:8.2f} ms" for k, v in res.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/out/lrea_serving.json")
    args = ap.parse_args(argv)
    rows = run("cpu", args.lengths, args.candidates, args.reps)
    if torch.cuda.is_available():
        rows += run("cuda", args.lengths, args.candidates, args.reps)
    summary = {}
    for dev in sorted({r["device"] for r in rows}):
        ms = {(r["L"], r["method"]): r["ms"] for r in rows if r["device"] == dev}
        L0, L1 = min(args.lengths), max(args.lengths)
        summary[dev] = {
            "lrea_cached_longest_over_shortest": ms[(L1, "lrea_cached")] / ms[(L0, "lrea_cached")],
            "din_over_lrea_cached_at_longest": ms[(L1, "din_long")] / ms[(L1, "lrea_cached")],
            "din_over_lrea_absorb_at_longest": ms[(L1, "din_long")] / ms[(L1, "lrea_absorb")],
        }
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores"
              + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
              "command": "python -m benchmarks.lrea_serving " + " ".join(argv or sys.argv[1:]),
              "rows": rows, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'device':<7}{'L':>7}{'lrea cached':>13}{'lrea absorb':>13}{'din long':>11}{'sim hard':>10}"
          f"{'din/lrea':>10}")
    for dev in sorted({r["device"] for r in rows}):
        for L in args.lengths:
            m = {r["method"]: r["ms"] for r in rows if r["device"] == dev and r["L"] == L}
            print(f"{dev:<7}{L:>7}{m['lrea_cached']:>11.2f}ms{m['lrea_absorb']:>11.2f}ms{m['din_long']:>9.1f}ms"
                  f"{m['sim_hard']:>8.2f}ms{m['din_long'] / m['lrea_cached']:>9.0f}x")
        s = summary[dev]
        print(f"{dev}: LREA cached at L={max(args.lengths)} vs L={min(args.lengths)}: "
              f"{s['lrea_cached_longest_over_shortest']:.2f}x; DIN / LREA cached at L={max(args.lengths)}: "
              f"{s['din_over_lrea_cached_at_longest']:.0f}x; DIN / LREA with absorb in the request: "
              f"{s['din_over_lrea_absorb_at_longest']:.0f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
