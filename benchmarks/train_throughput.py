"""Training throughput of every ranking model through the real training step, and the
fraction of the device's measured matmul rate it reaches.

  python -m benchmarks.train_throughput [--batch 4096] [--seq-len 200] [--steps 5]

The step is `training.step.train_step` (forward, loss terms, backward, Adam) — the one
the Ray Train loop runs — in bf16 autocast on CUDA, fp32 on CPU. The reference rate is
measured here, not taken from a datasheet: the best of several large square matmuls in
the same dtype. Model FLOPs per sample are counted by PyTorch's FlopCounterMode (the
optimizer's are not). Plain PyTorch: runs on a GPU machine without Ray. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.models import bench_spec, make_batch, model_flops
from models import build_model
from training.step import make_optimizer, train_step

MODELS = {
    "mean_pool": ("mean_pool", {"embed_dim": 64}),
    "din_short": ("din", {"embed_dim": 64, "sequence": "short"}),
    "dcnv2": ("dcnv2", {"embed_dim": 64}),
    "sim_hard": ("sim_hard", {"embed_dim": 64}),
    "cdnet": ("cdnet", {"embed_dim": 64, "topk_ratio": 0.1, "bins": 20}),
    "dlf": ("dlf", {"embed_dim": 64}),
    "lrea": ("lrea", {"embed_dim": 64}),
    "adaf2m2_dcnv2": ("adaf2m2:dcnv2", {"base": {"embed_dim": 64}}),
}


def matmul_rate(device: str, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Best measured FLOP/s of an n×n @ n×n matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def run(device: str, B: int, L: int, steps: int, names: list[str]) -> list[dict]:
    amp = torch.bfloat16 if device == "cuda" else None
    spec = bench_spec(L)
    rows = []
    for name in names:
        base, params = MODELS[name]
        torch.manual_seed(0)
        model = build_model(base, spec, params).to(device)
        opt = make_optimizer(model.parameters(), lr=1e-3)
        batch = make_batch(spec, B, device)
        train_step(model, batch, opt, amp)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(model, batch, opt, amp)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        fl = model_flops(base, params, spec, device)
        rows.append({"model": name, "device": device, "dtype": "bf16-autocast" if amp else "fp32", "batch": B,
                     "L": L, "samples_per_s": B / dt, "gflop_per_sample": fl / 1e9,
                     "achieved_tflops": fl * B / dt / 1e12})
        print(f"  {device} {name:<14} {B / dt:>10,.0f} samples/s  {fl * B / dt / 1e12:.3f} TFLOP/s", flush=True)
        del model, opt, batch
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default="benchmarks/out/train_throughput.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peak = matmul_rate(device, dtype, 8192 if device == "cuda" else 2048)
    rows = run(device, a.batch, a.seq_len, a.steps, a.models)
    for r in rows:
        r["fraction_of_matmul_rate"] = r["achieved_tflops"] * 1e12 / peak
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} {os.cpu_count()} cores"
    print(f"\ndevice: {name}; measured {'bf16' if device == 'cuda' else 'fp32'} matmul rate {peak / 1e12:.2f} TFLOP/s")
    print(f"{'model':<14}{'samples/s':>12}{'GFLOP/sample':>14}{'TFLOP/s':>9}{'of matmul':>11}")
    for r in rows:
        print(f"{r['model']:<14}{r['samples_per_s']:>12,.0f}{r['gflop_per_sample']:>14.4f}"
              f"{r['achieved_tflops']:>9.3f}{r['fraction_of_matmul_rate']:>10.1%}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": name,
                                       "matmul_tflops": peak / 1e12, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
