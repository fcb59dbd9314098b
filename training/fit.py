"""A plain-PyTorch fit loop for ranking models: epochs, validation each epoch, early
stopping on val AUC, the best weights kept, test at the end. The Ray Train loop runs the
same step and metrics; this one needs no Ray (benchmarks, GPU machines, notebooks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from training.step import predict_ranking, ranking_metrics, to_device, train_step

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]


@dataclass
class FitResult:
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)


def fit_ranking(model: nn.Module, train: Batches, val: Batches, test: Batches | None = None, *, epochs: int = 3,
                lr: float = 1e-3, weight_decay: float = 0.0, patience: int = 2, device: str = "cpu",
                amp_dtype: torch.dtype | None = None, seed: int = 0,
                on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Train with Adam; keep the epoch with the best val AUC; stop after `patience` epochs
    without improvement. `train`/`val`/`test` return a fresh iterable of batches per call."""
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, best_epoch, waited = -1.0, None, -1, 0
    res = FitResult(best_epoch=-1)
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        n = 0
        for b in train():
            for k, v in train_step(model, to_device(b, device), opt, amp_dtype).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        row = {"epoch": float(epoch), **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}}
        row |= {f"val_{k}": v for k, v in ranking_metrics(predict_ranking(model, val(), device, amp_dtype)).items()}
        res.history.append(row)
        if on_epoch:
            on_epoch(row)
        if row["val_auc"] > best:
            best, best_epoch, waited = row["val_auc"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    res.best_epoch = best_epoch
    res.val = ranking_metrics(predict_ranking(model, val(), device, amp_dtype))
    if test is not None:
        res.test = ranking_metrics(predict_ranking(model, test(), device, amp_dtype))
    return res
