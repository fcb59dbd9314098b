"""Retrieval metrics, vectorised over queries (never a Python loop per user).

retrieved (Q, K) item keys in rank order (0 = an empty slot); target (Q,) the clicked
item; relevant (Q, M) all relevant items, 0-padded. Titles are (.., T) token ids, 0 = pad.
"""

from __future__ import annotations

import numpy as np


def _hits(retrieved: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    top = retrieved[:, :k]
    return (top == target[:, None]) & (top > 0)  # (Q, k)


def hit_rate_at_k(retrieved: np.ndarray, target: np.ndarray, k: int) -> float:
    """Share of queries whose target is in the top k."""
    return float(_hits(retrieved, target, k).any(1).mean())


def ndcg_at_k(retrieved: np.ndarray, target: np.ndarray, k: int) -> float:
    """One relevant item: 1 / log2(rank + 2) when it is in the top k (IDCG = 1)."""
    h = _hits(retrieved, target, k)
    gains = h / np.log2(np.arange(2, h.shape[1] + 2))[None, :]
    return float(gains.sum(1).mean())


def recall_at_k(retrieved: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """|top k ∩ relevant| / |relevant| per query (queries with no relevant item skipped)."""
    top = retrieved[:, :k]
    relevant = _set_tokens(relevant)  # a relevant item listed twice counts once
    rel_ok = relevant > 0
    found = ((relevant[:, :, None] == top[:, None, :]) & rel_ok[:, :, None]).any(2)  # (Q, M)
    n_rel = rel_ok.sum(1)
    keep = n_rel > 0
    return float((found.sum(1)[keep] / n_rel[keep]).mean()) if keep.any() else 0.0


def _set_tokens(tokens: np.ndarray) -> np.ndarray:
    """Tokens with repeats within a title zeroed (set semantics), same shape."""
    srt = np.sort(tokens, axis=-1)
    rep = np.zeros_like(srt, dtype=bool)
    rep[..., 1:] = srt[..., 1:] == srt[..., :-1]
    return np.where(rep, 0, srt)


def jaccard_at_k(retrieved_titles: np.ndarray, target_title: np.ndarray, k: int) -> float:
    """JS@K: mean term-Jaccard between the target's title (Q, T) and each of the top-k
    retrieved items' titles (Q, K, T): the semantic fidelity of what was retrieved."""
    a = _set_tokens(target_title)[:, None, :]  # (Q, 1, T)
    b = _set_tokens(retrieved_titles[:, :k])  # (Q, k, T)
    inter = ((a[..., :, None] == b[..., None, :]) & (a[..., :, None] > 0)).any(-1).sum(-1)  # (Q, k)
    union = (a > 0).sum(-1) + (b > 0).sum(-1) - inter
    return float(np.where(union > 0, inter / np.maximum(union, 1), 0.0).mean())
