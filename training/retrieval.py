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
    """Item keys 1..N (row 0 = padding) with what retrieval needs about each item.

    titles:   (N + 1, T) title tokens (KARMA's item text; JS@K).
    oov:      (N + 1,) whether the item's ID is out of the train vocabulary (cold start).
    logq:     (N + 1,) log of the item's share of train clicks (floored at one click): the
              two-tower's sampled-softmax correction.
    features: item-side fields by name, (N + 1,) each — the static IDs from items.parquet and
              the item's past-only counters as of its last train click (0 for never-clicked
              items), i.e. what a serving index knows at the end of training.
    """

    titles: torch.Tensor
    oov: np.ndarray
    logq: np.ndarray
    features: dict[str, np.ndarray]

    @property
    def keys(self) -> np.ndarray:
        return np.arange(1, len(self.titles))

    @classmethod
    def from_dir(cls, root: str | Path) -> Catalogue:
        root = Path(root)
        items = pd.read_parquet(root / "items.parquet")
        keys = items["item_key"].to_numpy()
        n = keys.max() + 1
        tt = np.stack(items["title_tokens"].to_numpy())
        titles = np.zeros((n, tt.shape[1]), dtype=np.int64)
        titles[keys] = tt
        oov = np.zeros(n, dtype=bool)
        oov[keys] = items["item_idx"].to_numpy() == 1
        feats = {}
        for c in ("item_idx", "cat_idx", "brand_idx"):
            feats[c] = np.zeros(n, dtype=np.int64)
            feats[c][keys] = items[c].to_numpy()
        train = pd.read_parquet(root / "retrieval" / "split=train")
        clicks = np.bincount(train["item_key"].to_numpy(), minlength=n).astype(np.float64)
        logq = np.log(np.maximum(clicks, 1.0)) - np.log(np.maximum(clicks, 1.0).sum())
        last = train.sort_values("ts").drop_duplicates("item_key", keep="last")
        for c in [c for c in train.columns if c.startswith("item_") and c not in feats and c != "item_key"]:
            if np.issubdtype(train[c].dtype, np.number):
                feats[c] = np.zeros(n, dtype=np.float32)
                feats[c][last["item_key"].to_numpy()] = last[c].to_numpy()
        return cls(torch.tensor(titles), oov, logq.astype(np.float32), feats)


@torch.inference_mode()
def item_vectors(model, cat: Catalogue, device: str = "cpu", chunk: int = 65_536) -> torch.Tensor:
    """(N, d) embeddings of catalogue keys 1..N (row i = key i + 1) — what an index holds."""
    model.eval()
    keys = torch.as_tensor(cat.keys, device=device)
    out = []
    for i in range(0, len(keys), chunk):
        k = keys[i:i + chunk]
        if hasattr(model, "encode_item_table"):  # the two-tower: item-side fields
            kc = k.cpu().numpy()
            out.append(model.encode_item_table({f: torch.as_tensor(cat.features[f][kc], device=device)
                                                for f in model.item_fields}))
        else:  # KARMA: item text
            out.append(model.encode_items(k))
    return torch.cat(out)


def user_vectors(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, d) user embeddings from a retrieval batch."""
    if hasattr(model, "encode_item_table"):
        return model.encode_users(batch)
    return model.encode_users(batch["hist_item_key"], batch["hist_len"])


@torch.inference_mode()
def evaluate_retrieval(model, batches: Iterable[dict[str, torch.Tensor]], cat: Catalogue, k: int = 50,
                       device: str = "cpu") -> dict[str, float]:
    """Exact top-K over the whole catalogue for each row's user; HR/NDCG/JS@K (keys hr_K, ...)."""
    items = item_vectors(model, cat, device)  # (N, d)
    got, tgt = [], []
    for b in batches:
        b = to_device(b, device)
        u = user_vectors(model, b)  # (B, d)
        top = (u @ items.T).topk(min(k, len(items)), dim=1).indices + 1  # item keys
        got.append(top.cpu().numpy())
        tgt.append(b["item_key"].cpu().numpy())
    if not got:
        return {}
    return retrieval_metrics(np.concatenate(got), np.concatenate(tgt), cat, k)


def retrieval_metrics(retrieved: np.ndarray, target: np.ndarray, cat: Catalogue, k: int) -> dict[str, float]:
    """retrieved (B, ≥K) item keys, target (B,) → HR/NDCG/JS@K, and HR@K on cold-start targets."""
    titles = cat.titles.numpy()
    out = {f"hr_{k}": hit_rate_at_k(retrieved, target, k), f"ndcg_{k}": ndcg_at_k(retrieved, target, k),
           f"js_{k}": jaccard_at_k(titles[retrieved[:, :k]], titles[target], k), "n": float(len(target))}
    cold = cat.oov[target]
    if cold.any():
        out[f"hr_{k}_cold"] = hit_rate_at_k(retrieved[cold], target[cold], k)
        out["n_cold"] = float(cold.sum())
    return out


def fit_retrieval(model, train: Batches, val: Batches, test: Batches | None, cat: Catalogue, *, epochs: int = 3,
              lr: float = 1e-3, k: int = 50, patience: int = 2, device: str = "cpu", warmup_epochs: int = 0,
              seed: int = 0) -> FitResult:
    """KARMA or the two-tower: optional warm-up epochs (KARMA: titles decoded from item
    embeddings), then the model's loss; early stopping on val HR@K with the best weights kept."""
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(warmup_epochs):
        for b in train():
            loss = model.warmup_loss(b["item_key"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    best_epoch, history = fit_early_stopping(model, train, lambda: evaluate_retrieval(model, val(), cat, k, device),
                                             f"hr_{k}", opt, epochs=epochs, patience=patience, device=device)
    res = FitResult(best_epoch, history, evaluate_retrieval(model, val(), cat, k, device))
    if test is not None:
        res.test = evaluate_retrieval(model, test(), cat, k, device)
    return res
