"""What the served funnel knows about users and items: the ingest output, as of the end of the log.

- IDs: requests carry the log's canonical string IDs (`user_id`, `item_id`); they map to
  the dense keys of the pipeline. An unknown user gets key 0 — OOV profile, no history,
  zero counters: the cold-start path, not an error. An unknown item gets key 0 too and
  is scored with OOV IDs (or dropped from a history).
- Features of a (user, candidate) row are built exactly like a training row: the user's
  and the item's categorical IDs, their past-only counters as of their last logged
  example (the freshest state the log holds), the request's hour/day-of-week, a slate
  position, and the user's history = all logged clicks, most recent last (or the
  history the request sends, which wins).
- Vectorised: one fancy-index per field for all candidates of a request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.spec import FeatureSpec, behavior_age_bucket
from pipeline.history import HistoryStore


class FeatureStore:
    def __init__(self, root: str | Path, seq_len: int | None = None):
        root = Path(root)
        self.spec = FeatureSpec.from_json(root / "feature_spec.json")
        self.seq_len = seq_len or self.spec.seq_len
        users = pd.read_parquet(root / "users.parquet")
        items = pd.read_parquet(root / "items.parquet")
        self.history = HistoryStore.load(root)
        self._user_index = pd.Index(users["user_id"].astype(str).to_numpy())
        self._user_keys = users["user_key"].to_numpy(np.int64)
        self._item_index = pd.Index(items["item_id"].astype(str).to_numpy())
        self._item_keys = items["item_key"].to_numpy(np.int64)
        n_users, n_items = int(self._user_keys.max()) + 1, int(self._item_keys.max()) + 1
        self.item_id = np.empty(n_items, dtype=object)
        self.item_id[self._item_keys] = items["item_id"].astype(str).to_numpy()
        self.first_seen = np.zeros(n_items, dtype=np.int64)
        if "first_seen_ts" in items:
            self.first_seen[self._item_keys] = items["first_seen_ts"].fillna(0).to_numpy(np.int64)
        cat = self.spec.categorical
        # categorical tables by key; row 0 (unknown) = OOV (1) everywhere
        self.user_cat = {f: _table(n_users, users["user_key"], users[f]) for f in cat if f in users.columns}
        self.item_cat = {f: _table(n_items, items["item_key"], items[f]) for f in ("item_idx", "cat_idx", "brand_idx")}
        rows = pd.concat([pd.read_parquet(root / "ranking" / f"split={s}") for s in ("train", "val", "test")])
        rows = rows.sort_values("ts", kind="stable")
        self.user_num = _latest(rows, "user_key", n_users, [f for f in self.spec.numeric if f.startswith("user_")])
        self.item_num = _latest(rows, "item_key", n_items,
                                [f for f in self.spec.numeric if f.startswith("item_") and f != "item_age_days"])
        clicks = np.bincount(self.history.item_key, minlength=n_items)
        clicks[0] = -1
        self.popular = np.argsort(-clicks, kind="stable")  # item keys, most clicked first
        self.n_clicks = np.diff(self.history.offsets)

    # ------------------------------------------------------------------ ids

    def user_keys(self, ids: list[str]) -> np.ndarray:
        pos = self._user_index.get_indexer(pd.Index([str(i) for i in ids]))
        return np.where(pos >= 0, self._user_keys[pos], 0)

    def item_keys(self, ids: list[str]) -> np.ndarray:
        pos = self._item_index.get_indexer(pd.Index([str(i) for i in ids]))
        return np.where(pos >= 0, self._item_keys[pos], 0)

    def item_ids(self, keys: np.ndarray) -> list[str]:
        return [str(x) for x in self.item_id[np.asarray(keys, dtype=np.int64)]]

    # ------------------------------------------------------------------ histories

    def user_history(self, user_key: int, override: np.ndarray | None = None, length: int | None = None,
                     recent: np.ndarray | None = None) -> np.ndarray:
        """(≤ L,) item keys, most recent last: the request's own history if given, else the log's
        followed by `recent` (clicks fed back since the log ended, oldest first)."""
        return self.user_history_ts(user_key, override, length, recent)[0]

    def user_history_ts(self, user_key: int, override: np.ndarray | None = None, length: int | None = None,
                        recent: np.ndarray | None = None, recent_ts: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """`user_history` and the click time of each entry (0 = unknown: a history the request sent,
        or fed-back clicks without `recent_ts`), aligned with it."""
        length = length or self.seq_len
        if override is not None:
            keys = np.asarray(override, dtype=np.int64)[-length:]
            return keys, np.zeros(len(keys), dtype=np.int64)
        if user_key <= 0 or user_key >= len(self.n_clicks):
            logged, logged_ts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        else:
            g = self.history.gather(np.array([user_key]), np.array([self.n_clicks[user_key]]), length)
            n = int(g["len"][0])
            logged, logged_ts = g["item_key"][0, length - n:], g["click_ts"][0, length - n:]
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

    # ------------------------------------------------------------------ rows

    def ranking_batch(self, user_key: int, hist: np.ndarray, item_keys: np.ndarray, ts: int,
                      position: int = 1, seq_len: int | None = None,
                      hist_ts: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """C rows (one per candidate) in the model batch format of models/spec.py, with the
        history cut to `seq_len` (the model's own; default the data's long length). `hist_ts`:
        the click time of each history entry (`user_history_ts`), for the behaviors' age; without
        it every behavior's age is unknown."""
        c = len(item_keys)
        item_keys = np.asarray(item_keys, dtype=np.int64)
        u = np.full(c, user_key, dtype=np.int64)
        out: dict[str, torch.Tensor] = {}
        t = pd.Timestamp(int(ts), unit="s", tz="UTC")
        ctx = {"hour": t.hour, "dow": t.day_of_week, "position": position}
        for f in self.spec.categorical:
            if f in self.item_cat:
                v = self.item_cat[f][item_keys]
            elif f in self.user_cat:
                v = self.user_cat[f][u]
            elif f in ctx:
                v = np.full(c, ctx[f])
            else:
                v = np.ones(c, dtype=np.int64)  # a field serving does not know: OOV
            out[f] = torch.as_tensor(v.astype(np.int64))
        for f in self.spec.numeric:
            if f == "item_age_days":
                fs = self.first_seen[item_keys]
                v = np.where(fs > 0, (ts - fs) / 86400.0, -1.0)
            elif f in self.item_num:
                v = self.item_num[f][item_keys]
            elif f in self.user_num:
                v = self.user_num[f][u]
            else:
                v = np.zeros(c)
            out[f] = torch.as_tensor(np.asarray(v, dtype=np.float32))
        L = seq_len or self.seq_len
        keys = hist[-L:]
        seq = np.zeros(L, dtype=np.int64)
        if len(keys):
            seq[L - len(keys):] = keys
        for name, col in (("hist_item_idx", "item_idx"), ("hist_cat_idx", "cat_idx"), ("hist_brand_idx", "brand_idx")):
            tab = self.item_cat[col][seq] * (seq > 0)
            out[name] = torch.as_tensor(np.broadcast_to(tab, (c, L)).copy())
        out["hist_len"] = torch.full((c,), len(keys), dtype=torch.long)
        seq_ts = np.zeros(L, dtype=np.int64)
        if hist_ts is not None and len(keys):
            if len(hist_ts) != len(hist):
                raise ValueError(f"hist_ts has {len(hist_ts)} times for a history of {len(hist)}")
            seq_ts[L - len(keys):] = np.asarray(hist_ts, dtype=np.int64)[-L:]
        age = behavior_age_bucket(np.array([ts]), seq_ts[None, :], (seq > 0)[None, :])
        out["hist_age_idx"] = torch.as_tensor(np.broadcast_to(age, (c, L)).copy())
        return out


def _table(n: int, keys: pd.Series, values: pd.Series) -> np.ndarray:
    out = np.ones(n, dtype=np.int64)
    out[keys.to_numpy(np.int64)] = values.to_numpy(np.int64)
    return out


def _latest(rows: pd.DataFrame, key: str, n: int, cols: list[str]) -> dict[str, np.ndarray]:
    """Each key's values in its last row; an unknown key (and row 0) gets the median value of
    first appearances — the state of a newcomer (e.g. a CTR at the smoothing prior)."""
    last = rows.drop_duplicates(key, keep="last")
    first = rows.drop_duplicates(key, keep="first")
    k = last[key].to_numpy(np.int64)
    out = {}
    for c in cols:
        out[c] = np.full(n, float(first[c].astype(np.float64).median()), dtype=np.float32)
        out[c][k] = last[c].to_numpy(np.float32)
    return out
