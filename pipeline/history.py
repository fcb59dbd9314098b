"""Behavior sequences gathered at batch time from each user's click timeline.

An example stores (user_key, hist_end): its history is the user's clicks
[hist_end − L, hist_end) — all strictly before the example's ts, by
construction of hist_end. The timeline is held once, in CSR form, instead of
an L-long copy in every example (O(N·L) storage: 1M impressions × 200 × 3
fields × int64 ≈ 4.8 GB; the timeline is O(clicks)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class HistoryStore:
    """Users' click timelines (CSR) plus the item table's id lookups."""

    def __init__(self, clicks: pd.DataFrame, items: pd.DataFrame):
        c = clicks.sort_values(["user_key", "click_ts", "item_key"], kind="stable")
        self.item_key = c["item_key"].to_numpy(np.int64)
        self.click_ts = c["click_ts"].to_numpy(np.int64)
        n_users = int(c["user_key"].max()) + 2 if len(c) else 1
        counts = np.bincount(c["user_key"].to_numpy(), minlength=n_users)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        it = items.sort_values("item_key")
        size = int(it["item_key"].max()) + 1
        self.lookup = {}
        for col in ("item_idx", "cat_idx", "brand_idx"):
            arr = np.zeros(size, dtype=np.int64)
            arr[it["item_key"].to_numpy()] = it[col].to_numpy()
            self.lookup[col] = arr

    @classmethod
    def load(cls, root: str | Path) -> HistoryStore:
        root = Path(root)
        return cls(pd.read_parquet(root / "clicks"), pd.read_parquet(root / "items.parquet"))

    def gather(self, user_key: np.ndarray, hist_end: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """(B, L) item keys and their ids, most recent click last, left-padded with 0;
        plus `len` (B,) = min(hist_end, L). Vectorised: one fancy-index per field."""
        user_key = np.asarray(user_key, dtype=np.int64)
        start_u = self.offsets[np.minimum(user_key, len(self.offsets) - 2)]
        n = np.minimum(np.asarray(hist_end, dtype=np.int64), length)
        pos = start_u[:, None] + hist_end[:, None] - length + np.arange(length)[None, :]  # (B, L)
        valid = np.arange(length)[None, :] >= (length - n)[:, None]
        keys = np.where(valid, self.item_key[np.where(valid, pos, 0)] if len(self.item_key) else 0, 0)
        out = {"item_key": keys, "len": n}
        for col, arr in self.lookup.items():
            out[col] = np.where(valid, arr[keys], 0)
        out["click_ts"] = np.where(valid, self.click_ts[np.where(valid, pos, 0)] if len(self.click_ts) else 0, 0)
        return out
