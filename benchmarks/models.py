"""Forward+backward throughput of every ranking model at a realistic shape.

  python -m benchmarks.models                       # CPU (and CUDA bf16 autocast when present)
  python -m benchmarks.models --batch 4096 --lengths 200 1000 --steps 3

Shape: D = 64, 20 fields (12 categorical with production-like vocabularies, 8
numeric), behaviors of length L in --lengths, all rows with a full history (the
worst case for sequence models). FLOPs per sample are counted by PyTorch's
FlopCounterMode on one forward+backward. Where a model would not fit in memory at
--batch (attention over every behavior at L = 1,000), it runs at the largest batch
that does and the table says so. CDNet's claim (the full sequence costs more) is
the ratio of the two at L = 1,000, same batch.

Pure PyTorch: runs on a GPU machine without Ray. Prints a table, writes JSON.
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
from torch.utils.flop_counter import FlopCounterMode

from models import build_model, loss_terms, total_loss
from models.spec import FeatureSpec
from training.step import loss_weights

MODELS = {
    "mean_pool": ("mean_pool", {"embed_dim": 64}),
    "din_short": ("din", {"embed_dim": 64, "sequence": "short"}),
    "din_long": ("din", {"embed_dim": 64, "sequence": "long"}),
    "dcnv2": ("dcnv2", {"embed_dim": 64}),
    "cdnet": ("cdnet", {"embed_dim": 64, "topk_ratio": 0.1, "bins": 20}),
    "cdnet_full_seq": ("cdnet", {"embed_dim": 64, "full_sequence": True, "bins": 20}),
    "dlf": ("dlf", {"embed_dim": 64}),
    "adaf2m2_dcnv2": ("adaf2m2:dcnv2", {"base": {"embed_dim": 64}}),
    "adaf2m2_dlf": ("adaf2m2:dlf", {"base": {"embed_dim": 64}}),
}


def bench_spec(L: int) -> FeatureSpec:
    cats = {"user_idx": 200_000, "item_idx": 200_000, "cat_idx": 2_000, "brand_idx": 20_000, "u_age_idx": 8,
            "u_gender_idx": 4, "u_city_idx": 400, "u_occupation_idx": 32, "position": 64, "hour": 24, "dow": 7,
            "device_idx": 16}
    nums = {n: "log1p" for n in ("user_active_days_7", "user_active_days_30", "user_exposures_before",
                                 "user_clicks_before", "item_exposures_before", "item_clicks_before")}
    nums |= {"user_ctr": "none", "item_ctr": "none"}
    return FeatureSpec(categorical=cats, numeric=nums, seq_len=L, short_len=50)


def make_batch(spec: FeatureSpec, B: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = {n: torch.randint(1, v, (B,), generator=g) for n, v in spec.categorical.items()}
    b |= {n: torch.rand(B, generator=g) * 10 for n in spec.numeric}
    for f, v in (("hist_item_idx", "item_idx"), ("hist_cat_idx", "cat_idx"), ("hist_brand_idx", "brand_idx")):
        b[f] = torch.randint(1, spec.categorical[v], (B, spec.seq_len), generator=g)
    b["hist_len"] = torch.full((B,), spec.seq_len)
    b["label"] = (torch.rand(B, generator=g) < 0.1).float()
    return {k: v.to(device) for k, v in b.items()}


def step(model, batch, amp_dtype):
    """One forward+backward (no optimizer step: its cost is the optimizer's, not the model's)."""
    with torch.autocast(device_type=batch["label"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(batch)
        terms = loss_terms(out, batch["label"])
    loss = total_loss(terms, loss_weights(model))
    model.zero_grad(set_to_none=True)
    loss.backward()


def flops_per_sample(name: str, spec: FeatureSpec, device: str) -> float:
    return model_flops(*MODELS[name], spec, device)


def model_flops(base: str, params: dict, spec: FeatureSpec, device: str) -> float:
    """FLOPs per sample of one forward+backward, counted by FlopCounterMode."""
    m = build_model(base, spec, params).to(device).train()
    b = make_batch(spec, 32, device)
    with FlopCounterMode(display=False) as fc:
        out = m(b)
        total_loss(loss_terms(out, b["label"]), loss_weights(m)).backward()
    return fc.get_total_flops() / 32


def max_batch(name: str, L: int, B: int, mem_bytes: int) -> int:
    """Largest batch (≤ B, a multiple of 32) whose activations fit in 40% of free memory.

    Estimated per sample for the models that materialise per-behavior tensors: DIN's
    attention MLP input [q, k, q−k, q⊙k] and hidden layers over all L behaviors, and the
    full-sequence Transformer's (heads × T × T) scores; fp32, ×4 for what autograd keeps
    and the gradients. The rest stays at B."""
    db = 3 * 64
    T = L + 1 + 20
    per_sample = {
        "din_long": L * (4 * db + 64 + 32) * 4 * 4,
        "cdnet_full_seq": (2 * T * T + T * 64 * 8) * 4 * 4,
    }.get(name)
    if per_sample is None:
        return B
    return max(32, min(B, int(mem_bytes * 0.4 // per_sample) // 32 * 32))


def run(device: str, amp_dtype, B: int, lengths: list[int], steps: int, only: list[str]) -> list[dict]:
    import psutil

    mem = psutil.virtual_memory().available if device == "cpu" else torch.cuda.mem_get_info()[0]
    # a discarded pass: the first configuration of a process runs slow (see lrea_serving.py)
    warm_spec = bench_spec(min(lengths))
    warm = build_model("mean_pool", warm_spec, {"embed_dim": 64}).to(device)
    for _ in range(2):
        step(warm, make_batch(warm_spec, min(B, 1024), device), amp_dtype)
    del warm
    rows = []
    for L in lengths:
        spec = bench_spec(L)
        for name in only:
            base, params = MODELS[name]
            b_used = max_batch(name, L, B, mem)
            torch.manual_seed(0)
            model = build_model(base, spec, params).to(device).train()
            batch = make_batch(spec, b_used, device)
            step(model, batch, amp_dtype)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model, batch, amp_dtype)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
            fl = flops_per_sample(name, spec, device)
            rows.append({"model": name, "L": L, "batch": b_used, "device": device,
                         "dtype": "bf16-autocast" if amp_dtype else "fp32", "samples_per_s": b_used / dt,
                         "step_s": dt, "gflop_per_sample": fl / 1e9, "achieved_tflops": fl * b_used / dt / 1e12,
                         "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
            print(f"  {device} L={L:<5} {name:<16} B={b_used:<5} {b_used / dt:>10,.0f} samples/s  "
                  f"{fl / 1e9:.4f} GFLOP/sample", flush=True)
            del model, batch
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lengths", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default="benchmarks/out/models.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = run("cpu", None, args.batch, args.lengths, args.steps, args.models)
    if torch.cuda.is_available():
        rows += run("cuda", torch.bfloat16, args.batch, args.lengths, args.steps, args.models)
    ratio = {}
    for dev in {r["device"] for r in rows}:
        by = {(r["model"], r["L"]): r for r in rows if r["device"] == dev}
        L = max(args.lengths)
        if ("cdnet", L) in by and ("cdnet_full_seq", L) in by:
            ratio[dev] = by[("cdnet", L)]["samples_per_s"] / by[("cdnet_full_seq", L)]["samples_per_s"]
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores"
                         + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
              "command": "python -m benchmarks.models " + " ".join(argv or sys.argv[1:]),
              "rows": rows, "cdnet_over_full_sequence": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'model':<16}{'L':>6}{'device':>8}{'batch':>7}{'samples/s':>12}{'GFLOP/sample':>14}{'TFLOP/s':>9}{'params M':>10}")
    for r in rows:
        print(f"{r['model']:<16}{r['L']:>6}{r['device']:>8}{r['batch']:>7}{r['samples_per_s']:>12,.0f}"
              f"{r['gflop_per_sample']:>14.4f}{r['achieved_tflops']:>9.3f}{r['params_m']:>10.1f}")
    for dev, x in ratio.items():
        print(f"CDNet / full-sequence throughput at L={max(args.lengths)} on {dev}: {x:.1f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
