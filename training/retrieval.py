"""Retrieval training and evaluation for KARMA and the two-tower, plain PyTorch (no Ray).

Evaluation is the way a recall channel is used. Per test row (a click at time ts):

- candidates: every catalogue item released at ts (`Catalogue.released` ≤ ts; an item
  not yet released is not a candidate, for any method); exact inner-product top-K (FAISS
  serves the same embeddings later);
- the retriever alone, popularity alone (train clicks, the same availability mask) and,
  with `served=(R, P)`, the merged recall the server uses: popularity's top P and the
  retriever's best R items not among them (R + P distinct candidates, `serving.funnel.Retriever`),
  against popularity alone at the same size R + P — with the paired per-row difference of the
  hit and its standard error;
- HR@K, NDCG@K and JS@K (term Jaccard between the target's title and the retrieved
  titles), overall and for cold-start targets — items whose ID never appeared in training
  (item_idx = OOV), which only their text can place (popularity scores them 0);
- collapse diagnostics of the user vectors: the mean pairwise cosine across users and the
  effective rank (exp of the entropy of the normalised singular values).
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
from training.step import make_optimizer, to_device

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
    released: (N + 1,) the item's release time (first seen; −1 unknown = always available).
    clicks:   (N + 1,) train clicks per item (the popularity list).
    """

    titles: torch.Tensor
    oov: np.ndarray
    logq: np.ndarray
    features: dict[str, np.ndarray]
    released: np.ndarray | None = None
    clicks: np.ndarray | None = None
    title_text: np.ndarray | None = None  # (N + 1,) the raw titles (a pretrained text encoder's input)

    def __post_init__(self):
        n = len(self.titles)
        self.released = np.full(n, -1, np.int64) if self.released is None else self.released
        self.clicks = np.zeros(n) if self.clicks is None else self.clicks

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
        released = np.full(n, -1, dtype=np.int64)
        if "first_seen_ts" in items:
            released[keys] = items["first_seen_ts"].to_numpy()
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
        text = np.full(n, "", dtype=object)
        if "title" in items:
            text[keys] = items["title"].fillna("").astype(str).to_numpy()
        return cls(torch.tensor(titles), oov, logq.astype(np.float32), feats, released, clicks, text)


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
            out.append(model.encode_item_table(_fit_ids(model, {f: torch.as_tensor(cat.features[f][kc], device=device)
                                                                for f in model.item_fields})))
        else:  # KARMA: item text
            out.append(model.encode_items(k))
    return torch.cat(out)


def user_vectors(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, d) user embeddings from a retrieval batch."""
    if hasattr(model, "encode_item_table"):
        return model.encode_users(_fit_ids(model, batch))
    return model.encode_users(batch["hist_item_key"], batch["hist_len"])


def _fit_ids(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two-tower's id fields fitted to its own tables (`FeatureSpec.fit_ids`): a model trained on an
    earlier ingest, indexed or scored on one that extended its vocabularies (the gate's re-evaluation
    of a champion, a retriever the closed loop did not retrain), reads a new id as OOV. KARMA reads
    item keys and titles, which an extending ingest keeps."""
    return model.spec.fit_ids(batch)


def collapse_stats(users: np.ndarray, max_users: int = 2_000) -> dict[str, float]:
    """users (B, d) → mean pairwise cosine across users (1 = every user the same vector) and the
    effective rank exp(H(σ / Σσ)) of the centred vectors (1 = one direction)."""
    u = users[:max_users].astype(np.float64)
    if len(u) < 2:
        return {}
    n = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    c = n @ n.T
    cos = (c.sum() - np.trace(c)) / (len(u) * (len(u) - 1))
    sv = np.linalg.svd(u - u.mean(0), compute_uv=False)
    p = sv / max(sv.sum(), 1e-12)
    p = p[p > 0]
    return {"user_cos": float(cos), "user_eff_rank": float(np.exp(-(p * np.log(p)).sum()))}


@torch.inference_mode()
def evaluate_retrieval(model, batches: Iterable[dict[str, torch.Tensor]], cat: Catalogue, k: int = 50,
                       device: str = "cpu", served: tuple[int, int] | None = None) -> dict[str, float]:
    """The retriever's exact top-K over the items released at each row's ts; HR/NDCG/JS@K
    (keys hr_K, ...), cold-start HR@K and the collapse diagnostics. With `served=(R, P)` also
    popularity alone (`pop_*`) and the merged recall at the served sizes (`merged_*`)."""
    items = item_vectors(model, cat, device)  # (N, d), row i = key i + 1
    released = torch.as_tensor(cat.released[1:], device=device)
    depth = max(k, sum(served) if served else 0)  # R + P: the retriever's R after popularity's P
    got, tgt, ts_all, users = [], [], [], []  # rows without ts: every item is available
    for b in batches:
        b = to_device(b, device)
        u = user_vectors(model, b)  # (B, d)
        got.append(released_topk(u @ items.T, released, b.get("ts"), depth))
        tgt.append(b["item_key"].cpu().numpy())
        ts_all.append(b["ts"].cpu().numpy() if "ts" in b else np.full(len(u), np.iinfo(np.int64).max))
        users.append(u.float().cpu().numpy())
    if not got:
        return {}
    retrieved, target, ts = np.concatenate(got), np.concatenate(tgt), np.concatenate(ts_all)
    out = retrieval_metrics(retrieved, target, cat, k) | collapse_stats(np.concatenate(users))
    if served is not None:
        out |= served_recall(retrieved, target, ts, cat, k, *served)
    return out


def released_topk(scores: torch.Tensor, released: torch.Tensor, ts: torch.Tensor | None, k: int) -> np.ndarray:
    """scores (B, N) over keys 1..N → (B, k) the top keys among the items released at each row's
    ts (released (N,); ts (B,) or None = all available); 0 where fewer than k were released."""
    if ts is not None:
        scores = scores.masked_fill(released[None, :] > ts[:, None], float("-inf"))
    v, idx = scores.topk(min(k, scores.shape[1]), dim=1)
    return torch.where(torch.isfinite(v), idx + 1, 0).cpu().numpy()


def popularity_topk(cat: Catalogue, ts: np.ndarray, k: int, chunk: int = 4_096) -> np.ndarray:
    """(B, k) the most-clicked train items released at each row's ts (ties by key; 0 pads a
    catalogue with fewer than k released items)."""
    n = len(cat.clicks)
    rank = np.empty(n, dtype=np.float32)
    rank[np.lexsort((np.arange(n), -cat.clicks))] = -np.arange(n, dtype=np.float32)  # higher = more clicked
    score = torch.as_tensor(rank[1:])
    released = torch.as_tensor(cat.released[1:])
    out = [released_topk(score[None, :].expand(len(t), -1), released, torch.as_tensor(np.array(t)), k)
           for t in (ts[i:i + chunk] for i in range(0, len(ts), chunk))]
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def served_recall(retrieved: np.ndarray, target: np.ndarray, ts: np.ndarray, cat: Catalogue, k: int, r: int,
                  p: int) -> dict[str, float]:
    """Popularity alone at K (`pop_*`), at the channel's P and at the merged size R + P, and the
    merged recall: popularity's top P and the retriever's first R items not among them (as
    served: R + P distinct candidates, the size popularity alone is measured at; `retrieved` is
    read to depth R + P for the backfill). HR, its cold-start HR, and the paired per-row
    difference merged − popularity(R + P) with its standard error."""
    pop = popularity_topk(cat, ts, r + p)
    out = {f"pop_{key}": v for key, v in retrieval_metrics(pop, target, cat, k).items() if key not in ("n", "n_cold")}
    hit_pop_p = (pop[:, :p] == target[:, None]).any(1)
    hit_pop_all = (pop == target[:, None]).any(1)
    hit_merged = _backfilled_hit(retrieved[:, :r + p], pop[:, :p], target, r) | hit_pop_p
    d = hit_merged.astype(np.float64) - hit_pop_all
    out |= {f"pop_hr_{p}": float(hit_pop_p.mean()), f"pop_hr_{r + p}": float(hit_pop_all.mean()),
            f"retr_hr_{r}": float((retrieved[:, :r] == target[:, None]).any(1).mean()),
            f"merged_hr_{r}+{p}": float(hit_merged.mean()), "merged_minus_pop": float(d.mean()),
            "merged_minus_pop_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0}
    cold = cat.oov[target]
    if cold.any():
        out[f"merged_hr_{r}+{p}_cold"] = float(hit_merged[cold].mean())
        out[f"pop_hr_{r + p}_cold"] = float(hit_pop_all[cold].mean())
    return out


def _backfilled_hit(retrieved: np.ndarray, taken: np.ndarray, target: np.ndarray, r: int) -> np.ndarray:
    """(B,) whether the target is among each row's first r retrieved keys that are not in that
    row's `taken` (B, P) and not padding (0)."""
    off = (np.arange(len(retrieved), dtype=np.int64) * (int(max(retrieved.max(initial=0), taken.max(initial=0))) + 1))[:, None]
    fresh = ~np.isin(retrieved + off, taken + off) & (retrieved > 0)  # per row: a slot the retriever adds
    return ((retrieved == target[:, None]) & fresh & (np.cumsum(fresh, 1) <= r)).any(1)


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
    opt = make_optimizer(model.parameters(), lr=lr)
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
