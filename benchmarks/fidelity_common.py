"""What both halves of the fidelity report share: the budget, the data sampling and batching,
and the mean ± std formatting (benchmarks/fidelity.py, benchmarks/fidelity_retrieval.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm


@dataclass
class Budget:
    train_rows: int = 0  # 0 = the whole train split
    eval_rows: int = 0  # val / test rows; 0 = whole splits
    retrieval_train_rows: int = 30_000
    retrieval_eval_rows: int = 4_000
    epochs: int = 12  # the maximum; early stopping on val AUC ends most fits before
    patience: int = 2
    batch_size: int = 1024
    lr: float = 2e-3  # retrieval, and ranking families when the sweep is off
    lrs: tuple[float, ...] = (1e-3, 3e-3)  # the per-family sweep on seed 0 (ranking)
    device: str = "cpu"  # "cuda" where a GPU is present (bf16 autocast there)
    embed_dim: int = 16
    seq_len: int = 100
    karma_len: int = 20
    k: int = 50
    served: tuple[int, int] = (500, 100)  # serve.retrieve_top_n, serve.popular_n: the merged recall's sizes
    thresholds: dict[str, int] = field(default_factory=lambda: {"new_user_max_clicks": 2, "cold_item_max_clicks": 2})


def _rows(df: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: df[c].to_numpy() for c in df.columns}


def _split(root: Path, folder: str, split: str, n: int, seed: int) -> pd.DataFrame:
    df = pd.read_parquet(root / folder / f"split={split}")
    if n:  # the sample depends on the rows, not on the order the ingest's parallel writers left them in
        df = df.sort_values([c for c in ("ts", "user_key", "item_key", "position") if c in df], kind="stable")
        return df.sample(n=min(n, len(df)), random_state=seed).reset_index(drop=True)
    return df


def _batches(batcher, df: pd.DataFrame, bs: int, desc: str) -> list[dict[str, torch.Tensor]]:
    rows = _rows(df)
    steps = range(0, len(df), bs)
    return [batcher({k: v[i:i + bs] for k, v in rows.items()}) for i in tqdm(steps, desc=desc, leave=False,
                                                                                disable=not sys.stderr.isatty())]


def _shuffled(batches: list, seed: int):
    order = np.random.default_rng(seed).permutation(len(batches))
    return lambda: (batches[i] for i in order)


def mean_std(vals: list[float]) -> tuple[float, float]:
    v = np.array([x for x in vals if x is not None and x == x], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(vals: list[float]) -> str:
    m, s = mean_std(vals)
    return "–" if m != m else f"{m:.4f} ± {s:.4f}"
