"""A plain-PyTorch fit loop for ranking models: epochs, validation each epoch, early
stopping on val AUC, the best weights kept, test at the end. The Ray Train loop runs the
same step and metrics; this one needs no Ray (benchmarks, GPU machines, notebooks).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from training.step import predict_ranking, ranking_metrics, to_device, train_step

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]


@dataclass
class FitResult:
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)


def fit_early_stopping(model: nn.Module, train: Batches, evaluate: Callable[[], dict[str, float]], metric: str,
                       opt: torch.optim.Optimizer, *, epochs: int, patience: int, device: str = "cpu",
                       amp_dtype: torch.dtype | None = None,
                       on_epoch: Callable[[dict[str, float]], None] | None = None) -> tuple[int, list[dict[str, float]]]:
    """Train epochs; after each, `evaluate()` on validation data; keep the weights of the epoch
    with the best `metric` (higher is better) and stop after `patience` epochs without
    improvement. Returns (best epoch, per-epoch history); the model ends with the best weights."""
    best, best_state, best_epoch, waited = float("-inf"), None, -1, 0
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(train(), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not sys.stderr.isatty())
        for b in bar:
            for k, v in train_step(model, to_device(b, device), opt, amp_dtype).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        row = {"epoch": float(epoch), **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}}
        row |= {f"val_{k}": v for k, v in evaluate().items()}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if row[f"val_{metric}"] > best:
            best, best_epoch, waited = row[f"val_{metric}"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_epoch, history


def fit_ranking(model: nn.Module, train: Batches, val: Batches, test: Batches | None = None, *, epochs: int = 3,
                lr: float = 1e-3, weight_decay: float = 0.0, patience: int = 2, device: str = "cpu",
                amp_dtype: torch.dtype | None = None, seed: int = 0,
                on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Train with Adam; keep the epoch with the best val AUC; stop after `patience` epochs
    without improvement. `train`/`val`/`test` return a fresh iterable of batches per call."""
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    evaluate = lambda split: ranking_metrics(predict_ranking(model, split(), device, amp_dtype))  # noqa: E731
    best_epoch, history = fit_early_stopping(model, train, lambda: evaluate(val), "auc", opt, epochs=epochs,
                                             patience=patience, device=device, amp_dtype=amp_dtype, on_epoch=on_epoch)
    return FitResult(best_epoch, history, evaluate(val), evaluate(test) if test is not None else {})
