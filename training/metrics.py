"""Ranking and retrieval metrics, vectorised (never a Python loop per user or row).

Ranking: `auc`, `gauc` (per-user AUC weighted by the user's impressions, users with
one class skipped), `logloss`, `group_auc` (AUC within state groups, e.g. new vs old
users, cold vs hot items).
Retrieval: retrieved (Q, K) item keys in rank order (0 = an empty slot); target (Q,) the
clicked item; relevant (Q, M) all relevant items, 0-padded; titles (.., T) token ids, 0 = pad.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann–Whitney) formula, ties averaged; NaN with one class."""
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC (Zhou et al., 2018): Σ_u w_u AUC_u / Σ_u w_u, w_u = impressions of u,
    over users with both classes. One lexsort; ties averaged within (user, score)."""
    y = np.asarray(labels).astype(np.int64)
    s, g = np.asarray(scores, dtype=np.float64), np.asarray(groups)
    order = np.lexsort((s, g))
    y, s, g = y[order], s[order], g[order]
    n = len(y)
    new_g = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(new_g) - 1
    g_start = np.flatnonzero(new_g)
    pos_in_g = np.arange(n) - g_start[gid] + 1  # 1-based rank within the user
    new_tie = new_g | np.r_[True, s[1:] != s[:-1]]
    tid = np.cumsum(new_tie) - 1
    tie_rank = np.bincount(tid, weights=pos_in_g) / np.bincount(tid)  # average rank of each tie run
    rank = tie_rank[tid]
    n_pos = np.bincount(gid, weights=y)
    n_all = np.bincount(gid).astype(np.float64)
    n_neg = n_all - n_pos
    r_pos = np.bincount(gid, weights=rank * y)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    a = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float((a * n_all[ok]).sum() / n_all[ok].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def group_auc(labels: np.ndarray, scores: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC inside each named row subset (e.g. {"new_users": ..., "cold_items": ...})."""
    return {name: auc(labels[m], scores[m]) for name, m in masks.items()}


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
