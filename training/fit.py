"""The one early-stopping rule (`EarlyStopping`) and a plain-PyTorch fit loop around it:
epochs, validation each epoch, stop after `patience` epochs without a new best, the best
weights kept, test at the end. The Ray Train loop (training/loop.py) runs the same step,
metrics and `EarlyStopping` (its state travels in the checkpoint); this loop needs no Ray
(benchmarks, GPU machines, notebooks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from training.step import make_optimizer, predict_ranking, ranking_metrics, to_device, train_step

Batches = Callable[[], Iterable[dict[str, torch.Tensor]]]


@dataclass
class EarlyStopping:
    """Keep the best epoch by a higher-is-better metric; stop after `patience` epochs without a
    new best or after `max_epochs`. `state_dict()` / `load_state_dict()` carry it through a
    checkpoint (a resumed fit continues where it stopped, with the best weights so far)."""

    patience: int
    max_epochs: int
    epoch: int = 0  # epochs done
    best: float = float("-inf")
    best_epoch: int = -1
    waited: int = 0
    best_state: dict[str, torch.Tensor] | None = None

    def update(self, value: float, model: nn.Module) -> bool:
        """Record one finished epoch's metric; True when training should stop now."""
        if value > self.best:
            self.best, self.best_epoch, self.waited = value, self.epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.waited += 1
        self.epoch += 1
        return self.done

    @property
    def done(self) -> bool:
        return self.waited >= self.patience or self.epoch >= self.max_epochs

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "waited": self.waited,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        for k in ("epoch", "best", "best_epoch", "waited", "best_state"):
            setattr(self, k, state[k])


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
    stopper = EarlyStopping(patience, epochs)
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
        if stopper.update(row[f"val_{metric}"], model):
            break
    stopper.restore_best(model)
    return stopper.best_epoch, history


def fit_ranking(model: nn.Module, train: Batches, val: Batches, test: Batches | None = None, *, epochs: int = 3,
                lr: float = 1e-3, weight_decay: float = 0.0, patience: int = 2, device: str = "cpu",
                amp_dtype: torch.dtype | None = None, seed: int = 0,
                on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Train with Adam; keep the epoch with the best val AUC; stop after `patience` epochs
    without improvement. `train`/`val`/`test` return a fresh iterable of batches per call."""
    torch.manual_seed(seed)
    model.to(device)
    opt = make_optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)
    evaluate = lambda split: ranking_metrics(predict_ranking(model, split(), device, amp_dtype))  # noqa: E731
    best_epoch, history = fit_early_stopping(model, train, lambda: evaluate(val), "auc", opt, epochs=epochs,
                                             patience=patience, device=device, amp_dtype=amp_dtype, on_epoch=on_epoch)
    return FitResult(best_epoch, history, evaluate(val), evaluate(test) if test is not None else {})
