"""FAISS over item embeddings (KARMA's e_i or the two-tower's item tower), inner product.

One factory string from the config picks the index (`Flat`, `HNSW32`, `IVF1024,Flat`,
`IVF1024,PQ32`, ...); it is wrapped in an `IndexIDMap2` so FAISS returns item keys, and
cold-start items (no interactions: their ID is out of vocabulary) are embedded from their
text by the same model and `add`ed without retraining. On a machine with
`faiss.get_num_gpus() > 0` (the `gpu` extra), search runs on GPU 0; saved indexes are
always CPU indexes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np


@dataclass
class IndexParams:
    factory: str = "Flat"
    nprobe: int = 16  # IVF: inverted lists visited per query
    ef_search: int = 64  # HNSW: candidate list size per query
    use_gpu: bool = True  # when faiss has GPUs


class ItemIndex:
    def __init__(self, dim: int, params: IndexParams | None = None):
        self.params = params or IndexParams()
        self.dim = dim
        try:
            inner = faiss.index_factory(dim, self.params.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"index factory string {self.params.factory!r} is not valid for dim {dim}: {e}") from e
        self.cpu = faiss.IndexIDMap2(inner)
        self._gpu = None

    # ------------------------------------------------------------------ build / grow

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.cpu.is_trained)

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> ItemIndex:
        """Train (IVF/PQ need it) on `vectors` and add them under `keys`."""
        x = self._f32(vectors)
        if not self.cpu.is_trained:
            n_lists = _ivf_lists(self.params.factory)
            if n_lists and len(x) < n_lists:
                raise ValueError(f"{self.params.factory}: {len(x)} vectors cannot train {n_lists} inverted lists; "
                                 f"use at most IVF{max(1, len(x) // 39)} or Flat")
            self.cpu.train(x)
        return self.add(keys, x)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> ItemIndex:
        """Add (or replace) items: cold-start items join without retraining anything."""
        keys = np.asarray(keys, dtype=np.int64)
        x = self._f32(vectors)
        if len(keys) != len(x):
            raise ValueError(f"{len(keys)} keys for {len(x)} vectors")
        if self.ntotal:
            self.cpu.remove_ids(faiss.IDSelectorArray(keys))
        self.cpu.add_with_ids(x, keys)
        self._gpu = None
        return self

    # ------------------------------------------------------------------ search

    def _searcher(self):
        if self.params.use_gpu and faiss.get_num_gpus() > 0:  # pragma: no cover - needs a GPU build
            if self._gpu is None:
                self._gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.cpu)
            return self._gpu
        return self.cpu

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, d) queries → (Q, k) scores and item keys (−1 where fewer than k items exist)."""
        q = self._f32(queries)
        inner = faiss.downcast_index(self.cpu.index)
        if hasattr(inner, "nprobe"):
            inner.nprobe = self.params.nprobe
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = max(self.params.ef_search, k)
        return self._searcher().search(q, k)

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path, meta: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.cpu, str(folder / "index.faiss"))
        info = {"dim": self.dim, "factory": self.params.factory, "nprobe": self.params.nprobe,
                "ef_search": self.params.ef_search, "ntotal": self.ntotal, **(meta or {})}
        (folder / "index.json").write_text(json.dumps(info, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool = True) -> ItemIndex:
        folder = Path(folder)
        info = json.loads((folder / "index.json").read_text())
        out = cls.__new__(cls)
        out.dim = info["dim"]
        out.params = IndexParams(info["factory"], info["nprobe"], info["ef_search"], use_gpu)
        out.cpu = faiss.read_index(str(folder / "index.faiss"))
        out._gpu = None
        return out

    def _f32(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {x.shape}")
        return x


def _ivf_lists(factory: str) -> int:
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits) if digits else 0
    return 0


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) row indices of `items` with the highest inner products (the ground truth)."""
    s = np.asarray(queries, np.float32) @ np.asarray(items, np.float32).T
    idx = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(s, idx, 1).argsort(1)[:, ::-1]
    return np.take_along_axis(idx, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k found (order-free), vectorised."""
    hits = (found[:, :, None] == truth[:, None, :]).any(1)
    return float(hits.mean())
