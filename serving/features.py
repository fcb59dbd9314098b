"""What the served funnel knows about users and items: the ingest's catalogue and click timelines,
and the online state (pipeline/state.py) that moves with what the funnel serves and hears.

- IDs: requests carry the log's canonical string IDs (`user_id`, `item_id`); they map to
  the dense keys of the pipeline. An unknown user gets key 0 — OOV ids, no history,
  zero counters (a newcomer's first row in training): the cold-start path, not an error. An
  unknown item gets key 0 too and is scored with OOV ids (or dropped from a history).
- A (user, candidate, ts) row is built by the training path's own code: the feature columns by
  `pipeline.features.ranking_features` over the state as of ts (`FeatureState.rows`), the
  tensors by the training batcher (`training.batches.RankingBatcher.features`).
  tests/data/test_feature_parity.py holds served rows equal to the training rows.
- The history is the user's clicks strictly before ts — the logged timeline, then the clicks
  fed back since (`FeatureState.observe_clicks`) — or the history the request sends, which wins.
- Vectorised: one fancy-index per field for all candidates of a request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.spec import FeatureSpec
from pipeline.history import HistoryStore


class FeatureStore:
    def __init__(self, root: str | Path, seq_len: int | None = None, state=None):
        """`state`: the online state to read and update (a `pipeline.state.FeatureState`, or a client of the
        shared one, serving.state_store); default: this process's own, from the ingest's snapshot."""
        from pipeline.state import FeatureState

        root = Path(root)
        self.spec = FeatureSpec.from_json(root / "feature_spec.json")
        self.seq_len = seq_len or self.spec.seq_len
        users = pd.read_parquet(root / "users.parquet", columns=["user_id", "user_key"])
        items = pd.read_parquet(root / "items.parquet", columns=["item_id", "item_key", "first_seen_ts"])
        # the logged click timelines: those a replicated state copy loaded (`ReplicatedState.history`), else read here
        held = getattr(state, "history", None)
        self.history = held if isinstance(held, HistoryStore) else HistoryStore.load(root)
        self.state = state if state is not None else FeatureState.load(root, self.history)
        # object Indexes, not Arrow strings: a request's lookup of one user or ten items is a hash probe
        # (~1 µs) or one get_indexer (~70 µs) instead of ~210 µs (benchmarks/RESULTS.md, "Serving load")
        self._user_index = pd.Index(users["user_id"].astype(str).to_numpy(object), dtype=object)
        self._user_keys = users["user_key"].to_numpy(np.int64)
        self._item_index = pd.Index(items["item_id"].astype(str).to_numpy(object), dtype=object)
        self._item_keys = items["item_key"].to_numpy(np.int64)
        n_items = int(self._item_keys.max()) + 1
        self.item_id = np.empty(n_items, dtype=object)
        self.item_id[self._item_keys] = items["item_id"].astype(str).to_numpy()
        self.first_seen = np.full(n_items, -1, dtype=np.int64)
        self.first_seen[self._item_keys] = items["first_seen_ts"].fillna(-1).to_numpy(np.int64)
        clicks = np.bincount(self.history.item_key, minlength=n_items)
        clicks[0] = -1
        self.popular = np.argsort(-clicks, kind="stable")  # item keys, most clicked first
        self.n_clicks = np.diff(self.history.offsets)
        self._batchers: dict[int, object] = {}

    # ------------------------------------------------------------------ ids

    def user_keys(self, ids: list[str]) -> np.ndarray:
        pos = self._user_index.get_indexer(pd.Index([str(i) for i in ids], dtype=object))
        return np.where(pos >= 0, self._user_keys[pos], 0)

    def user_key(self, user_id: str, create: bool = False) -> int:
        """One user's key: the log's, else the online state's for a user born since (0 = none; with
        `create`, one is made: the server is about to write about them)."""
        try:
            k = int(self._user_keys[self._user_index.get_loc(str(user_id))])
        except KeyError:
            k = 0
        return k or int(self.state.online_key(str(user_id), create))

    def item_keys(self, ids: list[str]) -> np.ndarray:
        pos = self._item_index.get_indexer(pd.Index([str(i) for i in ids], dtype=object))
        return np.where(pos >= 0, self._item_keys[pos], 0)

    def item_ids(self, keys: np.ndarray) -> list[str]:
        return [str(x) for x in self.item_id[np.asarray(keys, dtype=np.int64)]]

    # ------------------------------------------------------------------ histories

    def user_history(self, user_key: int, override: np.ndarray | None = None, length: int | None = None,
                     recent: np.ndarray | None = None, ts: int | None = None) -> np.ndarray:
        """(≤ L,) item keys, most recent last: see `user_history_ts`."""
        return self.user_history_ts(user_key, override, length, recent, ts=ts)[0]

    def user_history_ts(self, user_key: int, override: np.ndarray | None = None, length: int | None = None,
                        recent: np.ndarray | None = None, recent_ts: np.ndarray | None = None,
                        ts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The user's history at ts (None: everything the state has observed) and each entry's click time
        (0 = unknown): the request's own history `override` if given (times unknown), else the state's
        timeline (logged clicks, then the clicks fed back), followed by `recent` (clicks the caller holds
        itself, oldest first, e.g. an offline replay)."""
        length = length or self.seq_len
        if override is not None:
            keys = np.asarray(override, dtype=np.int64)[-length:]
            return keys, np.zeros(len(keys), dtype=np.int64)
        view = self.state.user_view(int(user_key), _now(ts), length)
        logged, logged_ts = view.history, view.history_ts
        if recent is None or not len(recent):
            return logged, logged_ts
        r = np.asarray(recent, dtype=np.int64)
        rts = np.zeros(len(r), dtype=np.int64) if recent_ts is None else np.asarray(recent_ts, dtype=np.int64)
        if len(rts) != len(r):
            raise ValueError(f"recent_ts has {len(rts)} times for {len(r)} recent clicks")
        return np.concatenate([logged, r])[-length:], np.concatenate([logged_ts, rts])[-length:]

    def padded(self, hist: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L) left-padded keys and (1,) length."""
        out = np.zeros((1, length), dtype=np.int64)
        h = hist[-length:]
        if len(h):
            out[0, length - len(h):] = h
        return torch.as_tensor(out), torch.as_tensor([len(h)])

    # ------------------------------------------------------------------ online updates

    def observe_exposures(self, user_key: int, item_keys: np.ndarray, ts: int) -> None:
        """A served slate: its exposures move the user's and the items' counters."""
        self.state.observe_exposures(int(user_key), np.asarray(item_keys, dtype=np.int64), int(ts))

    def observe_clicks(self, user_key: int, item_keys: np.ndarray, ts: int) -> None:
        """Clicks fed back on a served slate: counters and the user's history move together."""
        self.state.observe_clicks(int(user_key), np.asarray(item_keys, dtype=np.int64), int(ts))

    # ------------------------------------------------------------------ rows

    def batcher(self, seq_len: int | None = None):
        """The training batcher at the model's history length (one per length, built once)."""
        from training.batches import RankingBatcher

        L = seq_len or self.seq_len
        b = self._batchers.get(L)
        if b is None:
            b = self._batchers[L] = RankingBatcher(self.spec, self.history, L)
        return b

    def ranking_batch(self, user_key: int, hist: np.ndarray, item_keys: np.ndarray, ts: int | None,
                      position: int = 0, seq_len: int | None = None,
                      hist_ts: np.ndarray | None = None, spec: FeatureSpec | None = None) -> dict[str, torch.Tensor]:
        """C rows (one per candidate) in the model batch format of models/spec.py, built by the training
        path's code from the state as of ts (None: now): `FeatureState.rows` → `RankingBatcher.features`.
        `hist`: the request's history (`user_history_ts`), cut to `seq_len` (the model's own); `hist_ts`:
        each entry's click time, for the behaviors' age (None: unknown); `position`: the 0-based slot;
        `spec`: the model's, when it was trained on an earlier ingest whose vocabularies this data
        extends (ids past its tables read as OOV, `FeatureSpec.fit_ids`)."""
        b = self.batcher(seq_len)
        ts = _now(ts)
        item_keys = np.asarray(item_keys, dtype=np.int64)
        if hist_ts is not None and len(hist_ts) != len(hist):
            raise ValueError(f"hist_ts has {len(hist_ts)} times for a history of {len(hist)}")
        rows = self.state.user_rows(int(user_key), item_keys, ts, position)  # the history is the request's
        times = np.zeros(len(hist), np.int64) if hist_ts is None else hist_ts
        batch = b.features(rows, b.history_arrays(hist, times, len(item_keys)))
        return spec.fit_ids(batch) if spec is not None and spec.categorical != self.spec.categorical else batch


def _now(ts: int | None) -> int:
    """A request without a time reads the state as of now: everything observed."""
    return int(ts) if ts is not None else np.iinfo(np.int64).max // 2
