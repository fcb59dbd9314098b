"""Training steps against FuxiCTR, side by side in one process, on identical batches.

  make bench-peer            # installs the benchmark-only extra (fuxictr) first
  python -m benchmarks.peer_fuxictr [--batch 4096] [--seq-len 200] [--threads 2] [--rounds 5]

What is compared: one full training step — zero_grad, forward, BCE-with-logits loss, backward,
Adam step, each framework's own (Funnel's fused Adam, `training.step.make_optimizer`; FuxiCTR's
`get_optimizer("adam")`, torch.optim.Adam's default; a "same Adam" column steps Funnel's model with
FuxiCTR's optimizer) — of Funnel's DCNv2 and DIN (`models/`) and of FuxiCTR's, on the same synthetic
batch (`benchmarks.models.make_batch`: 12 categorical and 8 numeric fields, three behavior
sequences of length L), at the same widths: D = 64, DCNv2 3 full-rank cross layers ‖ MLP
[256, 128]; DIN attention MLP [64, 32] with softmax, MLP [256, 128]; ReLU everywhere.

FuxiCTR's side is built from the layers its package ships (`fuxictr.pytorch.layers`:
FeatureEmbedding / FeatureEmbeddingDict, CrossNetV2, DIN_Attention, MLP_Block) wired the way
its model zoo wires DCNv2 (parallel structure) and DIN; the model-zoo classes themselves are
not on the package registry. Both sides see the same inputs: FuxiCTR's feature map declares
the three sequences with shared item/category/brand tables, pooled by its MaskedAveragePooling
for DCNv2 (Funnel's DCNv2 carries the mean-pooled history as one more slot) and by its target
attention for DIN. So both DCNv2s cross the same 23 × 64 = 1,472-wide x0.

Rounds alternate the models (A B A B …) so that machine noise falls on all of them; the table
gives the median samples/s over rounds and the ratio Funnel / FuxiCTR. Also a row for Funnel's
own `training.step.train_step`, the step the Ray Train loop runs (its extra loss terms and
per-step metric reads). Writes JSON. CUDA: run with --device cuda (bf16 autocast with --bf16;
tf32 matmuls with --tf32).
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
from torch import nn

from benchmarks.models import bench_spec, make_batch
from models import build_model
from models.spec import FeatureSpec
from training.step import make_optimizer, train_step

SEQ = (("hist_item_idx", "item_idx"), ("hist_cat_idx", "cat_idx"), ("hist_brand_idx", "brand_idx"))
WIDTHS = {"embed_dim": 64, "hidden": [256, 128]}


def fuxictr_feature_map(spec: FeatureSpec, dim: int, pool_sequences: bool):
    """FuxiCTR's FeatureMap for the batch's fields: categorical (padding 0), numeric, and the
    three behavior sequences sharing their item/category/brand tables."""
    from collections import OrderedDict

    from fuxictr.features import FeatureMap

    fmap = FeatureMap("funnel_peer", data_dir=".")
    fmap.default_emb_dim = dim
    feats = OrderedDict()
    for n, v in spec.categorical.items():
        feats[n] = {"type": "categorical", "source": "", "vocab_size": v, "padding_idx": 0}
    for n in spec.numeric:
        feats[n] = {"type": "numeric", "source": ""}
    for s, target in SEQ:
        feats[s] = {"type": "sequence", "source": "", "vocab_size": spec.categorical[target], "padding_idx": 0,
                    "max_len": spec.seq_len, "share_embedding": target}
        if pool_sequences:
            feats[s]["feature_encoder"] = "layers.MaskedAveragePooling()"
    fmap.features = feats
    fmap.num_fields = fmap.get_num_fields()
    fmap.set_column_index()
    return fmap


class FuxiDCNv2(nn.Module):
    """FuxiCTR's layers in its model zoo's parallel DCNv2: x0 = flattened field embeddings;
    CrossNetV2(x0) ‖ MLP_Block(x0) → Linear → logit."""

    def __init__(self, spec: FeatureSpec, dim: int, cross_layers: int, hidden: list[int]):
        super().__init__()
        from fuxictr.pytorch.layers import CrossNetV2, FeatureEmbedding, MLP_Block

        self.fmap = fuxictr_feature_map(spec, dim, pool_sequences=True)
        self.embedding = FeatureEmbedding(self.fmap, dim)
        d = self.fmap.sum_emb_out_dim()
        self.crossnet = CrossNetV2(d, cross_layers)
        self.dnn = MLP_Block(input_dim=d, output_dim=None, hidden_units=hidden, hidden_activations="ReLU")
        self.fc = nn.Linear(d + hidden[-1], 1)
        self.x0_width = d

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = self.embedding({k: batch[k] for k in self.fmap.features}, flatten_emb=True)
        return self.fc(torch.cat([self.crossnet(x0), self.dnn(x0)], -1)).squeeze(-1)


class FuxiDIN(nn.Module):
    """FuxiCTR's layers in its model zoo's DIN: target (item, category, brand) attends over the
    behavior triple with DIN_Attention; the pooled triple replaces the sequences; MLP_Block → logit."""

    def __init__(self, spec: FeatureSpec, dim: int, attention_hidden: list[int], hidden: list[int]):
        super().__init__()
        from fuxictr.pytorch.layers import DIN_Attention, FeatureEmbeddingDict, MLP_Block

        self.fmap = fuxictr_feature_map(spec, dim, pool_sequences=False)
        self.dim = dim
        self.embedding = FeatureEmbeddingDict(self.fmap, dim)
        self.attention = DIN_Attention(dim * len(SEQ), attention_units=attention_hidden, hidden_activations="ReLU",
                                       output_activation=None, use_softmax=True)
        self.dnn = MLP_Block(input_dim=self.fmap.sum_emb_out_dim(), output_dim=1, hidden_units=hidden,
                             hidden_activations="ReLU")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        X = {k: batch[k] for k in self.fmap.features}
        emb = self.embedding(X)
        target = torch.cat([emb[t] for _, t in SEQ], -1)
        seq = torch.cat([emb[s] for s, _ in SEQ], -1)
        pooled = self.attention(target, seq, X[SEQ[0][0]] != 0)
        for (s, _), e in zip(SEQ, pooled.split(self.dim, dim=-1), strict=True):
            emb[s] = e
        return self.dnn(self.embedding.dict2tensor(emb, flatten_emb=True)).squeeze(-1)


class FunnelLogit(nn.Module):
    """Funnel's model with its logit as the output, for the shared step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch).logits


def build(name: str, spec: FeatureSpec) -> nn.Module:
    if name == "funnel_dcnv2":
        return FunnelLogit(build_model("dcnv2", spec, {**WIDTHS, "cross_layers": 3}))
    if name == "funnel_din":
        return FunnelLogit(build_model("din", spec, {**WIDTHS, "attention_hidden": [64, 32], "sequence": "long"}))
    if name == "fuxictr_dcnv2":
        return FuxiDCNv2(spec, WIDTHS["embed_dim"], 3, WIDTHS["hidden"])
    if name == "fuxictr_din":
        return FuxiDIN(spec, WIDTHS["embed_dim"], [64, 32], WIDTHS["hidden"])
    raise ValueError(f"unknown model {name!r}")


TORCH_ADAM = "_torch_adam"  # a Funnel model stepped by torch.optim.Adam's default, FuxiCTR's optimizer


def optimizer_of(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """Each framework's own optimizer, as its trainer builds it: Funnel's `training.step.make_optimizer`
    (fused Adam), FuxiCTR's `get_optimizer("adam", …)` (torch.optim.Adam's default). A `_torch_adam`
    row is a Funnel model with FuxiCTR's optimizer: the models alone, side by side."""
    if name.startswith("fuxictr_"):
        from fuxictr.pytorch.torch_utils import get_optimizer

        return get_optimizer("adam", model.parameters(), 1e-3)
    if name.endswith(TORCH_ADAM):
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return make_optimizer(model.parameters(), lr=1e-3)


def shared_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict, amp: torch.dtype | None) -> torch.Tensor:
    """zero_grad, forward, BCE-with-logits, backward, Adam step; returns the loss (no host sync)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=batch["label"].device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logit = model(batch)
    loss = nn.functional.binary_cross_entropy_with_logits(logit.float(), batch["label"])
    loss.backward()
    opt.step()
    return loss.detach()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def run(names: list[str], B: int, L: int, steps: int, rounds: int, device: str, amp: torch.dtype | None,
        compile_models: bool) -> dict[str, dict]:

    spec = bench_spec(L)
    batch = make_batch(spec, B, device)
    setups = {}
    for name in names:
        torch.manual_seed(0)
        if name == "funnel_dcnv2_train_step":
            model = build("funnel_dcnv2", spec).model.to(device).train()
            opt = make_optimizer(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt):
                return train_step(model, batch, opt, amp)
        else:
            model = build(name.removesuffix(TORCH_ADAM), spec).to(device).train()
            fwd = torch.compile(model) if compile_models else model
            opt = optimizer_of(name, model)

            def step(fwd=fwd, opt=opt):
                return shared_step(fwd, opt, batch, amp)
        for _ in range(2):  # warm-up: allocator, Adam state, compile
            step()
        setups[name] = (model, step)
    secs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            secs[name].append(time_steps(setups[name][1], steps, device))
    out = {}
    for name in names:
        model = setups[name][0]
        dt = statistics.median(secs[name])
        out[name] = {"samples_per_s": B / dt, "ms_per_step": dt * 1e3,
                     "spread": [B / max(secs[name]), B / min(secs[name])],
                     "params": sum(p.numel() for p in model.parameters()),
                     "dense_params": sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n)}
        print(f"  {name:<26}{out[name]['samples_per_s']:>12,.0f} samples/s  ({dt * 1e3:.1f} ms/step)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--tf32", action="store_true", help="tf32 matmuls (CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models of the shared step (both sides; not the train_step row)")
    ap.add_argument("--models", nargs="+", default=["dcnv2", "din"], choices=["dcnv2", "din"])
    ap.add_argument("--out", default="benchmarks/out/peer_fuxictr.json")
    a = ap.parse_args(argv)
    try:
        import fuxictr
    except ImportError:
        print("peer_fuxictr: FuxiCTR is not installed. It is a benchmark-only extra: `make bench-peer`, or "
              "`.venv/bin/pip install -c requirements.lock fuxictr==2.3.10`.", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = torch.bfloat16 if a.bf16 else None
    dtype = "bf16-autocast" if a.bf16 else ("tf32" if a.tf32 else "fp32")
    machine = (torch.cuda.get_device_name() if a.device == "cuda"
               else f"{platform.machine()} {os.cpu_count()} cores, {a.threads} threads")
    print(f"peer_fuxictr: {machine}; {dtype}; B = {a.batch}, D = 64, 20 fields, L = {a.seq_len}; "
          f"torch {torch.__version__}, fuxictr {fuxictr.__version__}", flush=True)
    rows = []
    for m in a.models:
        names = [f"funnel_{m}", f"fuxictr_{m}", f"funnel_{m}{TORCH_ADAM}"] + (
            ["funnel_dcnv2_train_step"] if m == "dcnv2" else [])
        res = run(names, a.batch, a.seq_len, a.steps, a.rounds, a.device, amp, a.compile)
        f, x, same = res[f"funnel_{m}"], res[f"fuxictr_{m}"], res[f"funnel_{m}{TORCH_ADAM}"]
        rows.append({"model": m, "L": a.seq_len, "funnel": f, "fuxictr": x, "ratio": f["samples_per_s"] / x["samples_per_s"],
                     "funnel_torch_adam": same, "ratio_same_optimizer": same["samples_per_s"] / x["samples_per_s"],
                     **({"funnel_train_step": res["funnel_dcnv2_train_step"]} if m == "dcnv2" else {})})
    print(f"\n{'model':<8}{'Funnel /s':>12}{'FuxiCTR /s':>12}{'Funnel/FuxiCTR':>16}{'same Adam':>11}{'params F / X':>26}")
    for r in rows:
        print(f"{r['model']:<8}{r['funnel']['samples_per_s']:>12,.0f}{r['fuxictr']['samples_per_s']:>12,.0f}"
              f"{r['ratio']:>15.2f}x{r['ratio_same_optimizer']:>10.2f}x"
              f"{r['funnel']['params']:>14,} / {r['fuxictr']['params']:,}")
        if "funnel_train_step" in r:
            print(f"{'':<8}{r['funnel_train_step']['samples_per_s']:>12,.0f}  (Funnel's own train_step)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "dtype": dtype,
                                       "batch": a.batch, "seq_len": a.seq_len, "compile": a.compile,
                                       "torch": torch.__version__, "fuxictr": fuxictr.__version__, "rows": rows},
                                      indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
