"""The funnel's three stages as plain objects (no Ray): the Serve deployments wrap them,
and tests and the A/B simulation can run them in-process.

- `Retriever`: user history → the retrieval model's user vector (KARMA h_t, or the
  two-tower's user tower) → FAISS top-N item keys; merged with a popularity channel
  (the `popular_n` most clicked items), the usual second recall channel — a cold user
  with no history gets popular items, not an error.
- `Preranker`: LREA's absorbed serving path (eq. 9): one O(L) cache per user (kept in a
  bounded LRU), then O(r·d) per candidate; optionally fused with the retrieval score,
  `s = lrea_logit + w · retrieval_score` → top-M.
- `Ranker`: a CTR model (CDNet, DLF, or AdaF2M2's main path) over the candidates → top-K
  with probabilities; in the funnel optionally ordered by its logit + w · the pre-rank score
  (`serve.prerank_weight`).

`Retriever.retrieve_many` and `Ranker.rank_many` serve several requests with one forward
pass (the Serve stages feed them through `@serve.batch`); `retrieve` / `rank` are the
one-request case. The ranker's batch marks which rows share one history (`hist_group`, one per
request), so CDNet computes its history side once per request (models/layers.py, `Embedded.group`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from serving.features import FeatureStore
from serving.index import ItemIndex


@dataclass
class Scored:
    keys: np.ndarray  # (n,) item keys, best first
    scores: np.ndarray  # (n,)
    pos: np.ndarray | None = None  # (n,) where each came from in the stage's input candidates (pre-ranking, ranking)


def _scores_of(keys: np.ndarray, found: np.ndarray, scores: np.ndarray, default: float) -> np.ndarray:
    """Each key's score where the index returned it (`found`, `scores`), else `default`."""
    if not len(found):
        return np.full(len(keys), default, np.float32)
    match = found[:, None] == keys[None, :]  # (n + popular_n, popular_n): small
    return np.where(match.any(0), scores[match.argmax(0)], default).astype(np.float32)


class Retriever:
    """The recall stage: popularity's `popular_n` and the index's best n items not among them
    (n + popular_n distinct candidates: a retriever that ranks popular items high is backfilled from
    its next ranks, the way `training.retrieval.served_recall` measures it). A popular item the
    index also returned keeps its retrieval score; the others get the lowest retrieved score."""

    def __init__(self, model: torch.nn.Module, index: ItemIndex, store: FeatureStore, popular_n: int = 100):
        self.model, self.index, self.store, self.popular_n = model.eval(), index, store, popular_n

    @torch.inference_mode()
    def user_vectors(self, user_keys: list[int], hists: list[np.ndarray],
                     ts: list[int | None] | None = None) -> np.ndarray:
        """(B, d) user vectors of B requests in one forward pass (`ts`: each request's time; None = now)."""
        if hasattr(self.model, "encode_item_table"):  # two-tower: the user tower reads a full row
            ts = ts or [None] * len(user_keys)
            rows = [self.store.ranking_batch(u, h, np.zeros(1, dtype=np.int64), ts=t,
                                             seq_len=self.model.spec.seq_len, spec=self.model.spec)
                    for u, h, t in zip(user_keys, hists, ts, strict=True)]
            return self.model.encode_users({k: torch.cat([r[k] for r in rows]) for k in rows[0]}).numpy()
        padded = [self.store.padded(h, self.model.max_history) for h in hists]
        keys = torch.cat([p[0] for p in padded])
        n = torch.cat([p[1] for p in padded])
        return self.model.encode_users(keys, n).numpy()

    def retrieve_many(self, user_keys: list[int], hists: list[np.ndarray], n: int,
                      ts: list[int | None] | None = None) -> list[Scored]:
        two_tower = hasattr(self.model, "encode_item_table")
        use = [i for i, h in enumerate(hists) if len(h) or two_tower]  # no history, no vector: popular only
        ts = ts or [None] * len(hists)
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if use:
            vecs = self.user_vectors([user_keys[i] for i in use], [hists[i] for i in use], [ts[i] for i in use])
            scores, keys = self.index.search(vecs, n + self.popular_n)  # n of them beside the popular
            found = {i: (scores[j], keys[j]) for j, i in enumerate(use)}
        pop = self.store.popular[: self.popular_n]
        out = []
        for i in range(len(hists)):
            all_s, all_k = found.get(i, (np.zeros(0, np.float32), np.zeros(0, np.int64)))
            ok = np.flatnonzero((all_k > 0) & ~np.isin(all_k, pop))[:n]  # the index's best n not already popular
            scores, keys = all_s[ok], all_k[ok]
            floor = float(scores.min()) if len(scores) else 0.0
            out.append(Scored(np.concatenate([keys, pop]), np.concatenate([scores, _scores_of(pop, all_k, all_s, floor)])))
        return out

    def retrieve(self, user_key: int, hist: np.ndarray, n: int, ts: int | None = None) -> Scored:
        return self.retrieve_many([user_key], [hist], n, [ts])[0]


class Preranker:
    """`short_exact` (LREA's `absorb`): a user with fewer behaviors than the rank is scored by the
    training path itself over them (exact, and cheaper); False scores every user by eq. 9."""

    def __init__(self, model: torch.nn.Module, store: FeatureStore, retrieval_weight: float = 0.0,
                 cache_users: int = 10_000, short_exact: bool = True):
        self.model, self.store, self.w = model.eval(), store, retrieval_weight
        self.cache: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.cache_users, self.short_exact = cache_users, short_exact

    def _cache(self, user_key: int, hist: np.ndarray, row: dict[str, torch.Tensor]):
        key = (user_key, hash(hist[-self.model.spec.seq_len:].tobytes()))  # a new click: a new entry
        hit = self.cache.get(key)
        if hit is None:
            hit = self.model.absorb_batch({k: v[:1] for k, v in row.items()}, short_exact=self.short_exact)
            self.cache[key] = hit
            if len(self.cache) > self.cache_users:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        return hit

    @torch.inference_mode()
    def prerank(self, user_key: int, hist: np.ndarray, cands: Scored, m: int, ts: int) -> Scored:
        """The top m of the candidates released at ts (an item not yet released at the request time
        is never a candidate: the index holds the whole catalogue, future releases included)."""
        idx = np.flatnonzero(self.store.first_seen[cands.keys] <= ts)  # released candidates, input order
        keys = cands.keys[idx]
        if not len(keys):
            return Scored(keys, cands.scores[idx], idx)
        rows = self.store.ranking_batch(user_key, hist, keys, ts, seq_len=self.model.spec.seq_len, spec=self.model.spec)
        cache = self._cache(user_key, hist, rows)
        cand = {k: v for k, v in rows.items() if not k.startswith("hist_")}
        s = self.model.score(cache, cand).float().numpy() + self.w * cands.scores[idx]
        top = np.argsort(-s, kind="stable")[:m]
        return Scored(keys[top], s[top], idx[top])


class Ranker:
    """`prior_weight` w (serve.prerank_weight): a request that sends its candidates' pre-rank
    scores (the funnel's, from the `Preranker`) is ordered by ranker logit + w · pre-rank score, a
    late fusion of two models whose errors are partly independent (benchmarks/RESULTS.md, "The
    ranking stage, term by term"). The scores returned stay the ranker's probabilities."""

    def __init__(self, model: torch.nn.Module, store: FeatureStore, prior_weight: float = 0.0):
        self.model, self.store, self.prior_weight = model.eval(), store, float(prior_weight)

    @torch.inference_mode()
    def rank_many(self, reqs: list[tuple]) -> list[Scored]:
        """(user key, history, candidate keys, k, ts[, history click times[, prior]]) per request →
        top-k of each, one forward pass. `prior`: (n,) the candidates' pre-rank scores, or None."""
        sizes = [len(r[2]) for r in reqs]
        rows = [self.store.ranking_batch(r[0], r[1], np.asarray(r[2], dtype=np.int64), r[4],
                                         seq_len=self.model.spec.seq_len, hist_ts=r[5] if len(r) > 5 else None,
                                         spec=self.model.spec)
                for r in reqs if len(r[2])]
        z = p = np.zeros(0, np.float32)
        if rows:
            batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
            # the rows of one request hold one history: a model may compute its history side once per request
            batch["hist_group"] = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([c for c in sizes if c]))
            logits = self.model(batch).logits.float()
            z, p = logits.numpy(), torch.sigmoid(logits).numpy()
        out, start = [], 0
        for r, c in zip(reqs, sizes, strict=True):
            keys, k, prior = r[2], r[3], r[6] if len(r) > 6 else None
            zi, pi = z[start:start + c], p[start:start + c]
            start += c
            order = zi + self.prior_weight * np.asarray(prior, np.float32) if prior is not None and self.prior_weight else zi
            top = np.argsort(-order, kind="stable")[:k]
            out.append(Scored(np.asarray(keys, dtype=np.int64)[top], pi[top], top))
        return out

    def rank(self, user_key: int, hist: np.ndarray, keys: np.ndarray, k: int, ts: int,
             hist_ts: np.ndarray | None = None, prior: np.ndarray | None = None) -> Scored:
        return self.rank_many([(user_key, hist, keys, k, ts, hist_ts, prior)])[0]
