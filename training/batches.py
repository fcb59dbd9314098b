"""Example rows (the ingest's Parquet) → model batches: histories gathered at batch time.

`RankingBatcher` turns a dict of NumPy columns of ranking examples into the batch of
models/spec.py (hist_item_idx / hist_cat_idx / hist_brand_idx, hist_len, fields,
label); `RetrievalBatcher` does the same for retrieval examples (hist_item_key, item_key,
hard_negs, target_title, state signals). Pure NumPy/PyTorch: usable as the
`collate_fn` of Ray Data's `iter_torch_batches`, or on a plain DataFrame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.spec import FeatureSpec, behavior_age_bucket
from pipeline.history import HistoryStore

_SEQ = {"hist_item_idx": "item_idx", "hist_cat_idx": "cat_idx", "hist_brand_idx": "brand_idx"}


def _column(batch: dict[str, np.ndarray], name: str) -> np.ndarray:
    v = batch[name]
    if v.dtype == object:  # list columns arrive as arrays of arrays
        return np.stack(v)
    return v


class RankingBatcher:
    """With `karma` (a trained KARMA), each row also gets `karma_sim`: the cosine between the
    user's next-interest embedding from the same strictly-past history and the target item's
    embedding — KARMA's use as a ranking feature (paper 004); build the ranking model on
    `spec.with_numeric("karma_sim")`."""

    def __init__(self, spec: FeatureSpec, history: HistoryStore, seq_len: int | None = None, karma=None,
                 karma_len: int = 50):
        self.spec, self.history, self.karma, self.karma_len = spec, history, karma, karma_len
        self.seq_len = seq_len or spec.seq_len

    @classmethod
    def from_dir(cls, root: str | Path, seq_len: int | None = None) -> RankingBatcher:
        spec = FeatureSpec.from_json(Path(root) / "feature_spec.json")
        if seq_len:
            spec.seq_len = seq_len
        return cls(spec, HistoryStore.load(root), seq_len)

    def _fields_and_history(self, rows: dict[str, np.ndarray], present_only: bool,
                            g: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
        """Spec fields as tensors (all of them, or those `rows` has) plus the histories: gathered from the
        click timelines at (user_key, hist_end), or `g` as `HistoryStore.gather` returns it (serving: the
        online state's timeline)."""
        if g is None:
            g = self.history.gather(np.asarray(rows["user_key"]), np.asarray(rows["hist_end"]), self.seq_len)
        keep = (lambda n: n in rows) if present_only else (lambda n: True)
        out = {n: torch.as_tensor(np.asarray(rows[n]).astype(np.int64)) for n in self.spec.categorical if keep(n)}
        out |= {n: torch.as_tensor(np.asarray(rows[n]).astype(np.float32)) for n in self.spec.numeric if keep(n)}
        out |= {s: torch.as_tensor(g[f]) for s, f in _SEQ.items()}
        out["hist_len"] = torch.as_tensor(g["len"])
        if "ts" in rows:  # each behavior's age at the row's time (models/spec.py: hist_age_idx)
            out["hist_age_idx"] = torch.as_tensor(behavior_age_bucket(rows["ts"], g["click_ts"], g["item_key"] > 0))
        return out, g

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out, _ = self._fields_and_history(rows, present_only=False)  # a missing field is a KeyError naming it
        out["label"] = torch.as_tensor(np.asarray(rows["label"]).astype(np.float32))
        out["user_key"] = torch.as_tensor(np.asarray(rows["user_key"]).astype(np.int64))
        if self.karma is not None:
            out["karma_sim"] = self.karma_similarity(rows)
        return out

    def features(self, rows: dict[str, np.ndarray], g: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The model inputs of unlabelled rows whose histories are already gathered (serving builds `rows`
        with pipeline.state.FeatureState.rows and `g` with `history_arrays`): the same tensors as
        `__call__` for the same rows, without the label."""
        out, _ = self._fields_and_history(rows, present_only=False, g=g)
        out["user_key"] = torch.as_tensor(np.asarray(rows["user_key"]).astype(np.int64))
        return out

    def history_arrays(self, keys: np.ndarray, times: np.ndarray, rows: int) -> dict[str, np.ndarray]:
        """One history (item keys and click times, most recent last) as `HistoryStore.gather` lays out
        `rows` copies of it: (rows, L) left-padded arrays and `len`."""
        L = self.seq_len
        keys, times = np.asarray(keys, np.int64)[-L:], np.asarray(times, np.int64)[-L:]
        k = np.zeros(L, np.int64)
        t = np.zeros(L, np.int64)
        if len(keys):
            k[L - len(keys):], t[L - len(keys):] = keys, times
        out = {"item_key": k, "click_ts": t}
        out |= {col: np.where(k > 0, arr[k], 0) for col, arr in self.history.lookup.items()}
        out = {n: np.repeat(v[None, :], rows, axis=0) for n, v in out.items()}
        out["len"] = np.full(rows, len(keys), np.int64)
        return out

    @torch.inference_mode()
    def karma_similarity(self, rows: dict[str, np.ndarray]) -> torch.Tensor:
        """(B,) cos(h_user, e_target) from the frozen KARMA, on the user's last `karma_len` clicks."""
        g = self.history.gather(np.asarray(rows["user_key"]), np.asarray(rows["hist_end"]), self.karma_len)
        self.karma.eval()
        u = self.karma.encode_users(torch.as_tensor(g["item_key"]), torch.as_tensor(g["len"]))
        v = self.karma.encode_items(torch.as_tensor(np.asarray(rows["item_key"]).astype(np.int64)))
        return torch.nn.functional.cosine_similarity(u, v, dim=-1).float()


class RetrievalBatcher(RankingBatcher):
    """Adds what retrieval models read: item keys of the history, the target and the hard
    negatives; with `logq` (per item key, training.retrieval.Catalogue) also `item_logq`."""

    def __init__(self, spec: FeatureSpec, history: HistoryStore, seq_len: int | None = None,
                 logq: np.ndarray | None = None):
        super().__init__(spec, history, seq_len)
        self.logq = logq

    @classmethod
    def from_dir(cls, root: str | Path, seq_len: int | None = None, logq: np.ndarray | None = None) -> RetrievalBatcher:
        b = super().from_dir(root, seq_len)
        b.logq = logq
        return b

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out, g = self._fields_and_history(rows, present_only=True)  # retrieval rows carry no context fields
        out["hist_item_key"] = torch.as_tensor(g["item_key"])
        out["item_key"] = torch.as_tensor(np.asarray(rows["item_key"]).astype(np.int64))
        out["hard_negs"] = torch.as_tensor(_column(rows, "hard_negs").astype(np.int64))
        out["target_title"] = torch.as_tensor(_column(rows, "target_title").astype(np.int64))
        if "ts" in rows:  # availability of candidates at the request time (uniform negatives, evaluation)
            out["ts"] = torch.as_tensor(np.asarray(rows["ts"]).astype(np.int64))
        if self.logq is not None:
            out["item_logq"] = torch.as_tensor(self.logq[out["item_key"].numpy()])
        return out
