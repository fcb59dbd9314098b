"""Retrieval training and evaluation for KARMA, plain PyTorch (no Ray).

Evaluation scores every item of the catalogue (exact inner-product top-K; FAISS serves
the same embeddings later): HR@K, NDCG@K and JS@K (term Jaccard between the target's
title and the retrieved titles), overall and for cold-start targets — items whose ID
never appeared in training (item_idx = OOV), which only their text can place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from training.fit import FitResult, fit_early_stopping
from training.metrics import hit_rate_at_k, jaccard_at_k, ndcg_at_k
from training.step import to_device

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]


@dataclass
class Catalogue:
    """Item keys 1..N with their title tokens and whether their ID is out of vocabulary."""

    titles: torch.Tensor  # (N + 1, T), row 0 = padding
    oov: np.ndarray  # (N + 1,) bool

    @classmethod
    def from_dir(cls, root: str | Path) -> Catalogue:
        items = pd.read_parquet(Path(root) / "items.parquet")
        keys = items["item_key"].to_numpy()
        tt = np.stack(items["title_tokens"].to_numpy())
        titles = np.zeros((keys.max() + 1, tt.shape[1]), dtype=np.int64)
        titles[keys] = tt
        oov = np.zeros(keys.max() + 1, dtype=bool)
        oov[keys] = items["item_idx"].to_numpy() == 1
        return cls(torch.tensor(titles), oov)


@torch.inference_mode()
def evaluate_karma(model, batches: Iterable[dict[str, torch.Tensor]], cat: Catalogue, k: int = 50,
                   device: str = "cpu") -> dict[str, float]:
    model.eval()
    keys = torch.arange(1, len(cat.titles), device=device)
    items = model.encode_items(keys)  # (N, d)
    got, tgt = [], []
    for b in batches:
        b = to_device(b, device)
        u = model.encode_users(b["hist_item_key"], b["hist_len"])  # (B, d)
        top = (u @ items.T).topk(min(k, len(keys)), dim=1).indices + 1  # item keys
        got.append(top.cpu().numpy())
        tgt.append(b["item_key"].cpu().numpy())
    if not got:
        return {}
    retrieved, target = np.concatenate(got), np.concatenate(tgt)
    titles = cat.titles.numpy()
    out = {f"hr@{k}": hit_rate_at_k(retrieved, target, k), f"ndcg@{k}": ndcg_at_k(retrieved, target, k),
           f"js@{k}": jaccard_at_k(titles[retrieved], titles[target], k), "n": float(len(target))}
    cold = cat.oov[target]
    if cold.any():
        out[f"hr@{k}_cold"] = hit_rate_at_k(retrieved[cold], target[cold], k)
        out["n_cold"] = float(cold.sum())
    return out


def fit_karma(model, train: Batches, val: Batches, test: Batches | None, cat: Catalogue, *, epochs: int = 3,
              lr: float = 1e-3, k: int = 50, patience: int = 2, device: str = "cpu", warmup_epochs: int = 0,
              seed: int = 0) -> FitResult:
    """Optional warm-up epochs (titles decoded from item embeddings), then the KARMA loss;
    early stopping on val HR@K with the best weights kept."""
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(warmup_epochs):
        for b in train():
            loss = model.warmup_loss(b["item_key"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    best_epoch, history = fit_early_stopping(model, train, lambda: evaluate_karma(model, val(), cat, k, device),
                                             f"hr@{k}", opt, epochs=epochs, patience=patience, device=device)
    res = FitResult(best_epoch, history, evaluate_karma(model, val(), cat, k, device))
    if test is not None:
        res.test = evaluate_karma(model, test(), cat, k, device)
    return res
