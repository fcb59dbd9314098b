"""The training step and evaluation, plain PyTorch (no Ray, no MLflow): the Ray Train loop,
the benchmarks and a GPU machine without Ray all call these.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from models.losses import loss_terms, total_loss
from training.metrics import auc, gauc, group_auc, logloss


def loss_weights(model: nn.Module) -> dict[str, float]:
    m = model.module if hasattr(model, "module") else model  # DDP-wrapped
    return m.loss_weights() if hasattr(m, "loss_weights") else {}


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    dev = torch.device(device).type
    return torch.autocast(device_type=dev, dtype=dtype) if dtype is not None else nullcontext()


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, fused: one kernel over all parameters instead of a loop of ops per tensor — the same
    updates as `torch.optim.Adam`'s default (tests/unit/test_optimizer.py) at 140 → 20 ms per step over
    DCNv2's 34M parameters on 2 CPU cores (benchmarks/RESULTS.md, "Training steps against FuxiCTR").
    Fused Adam runs on CPU and CUDA; its state dict is the plain Adam's, so checkpoints load either way."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               amp_dtype: torch.dtype | None = None, clip_norm: float = 0.0) -> dict[str, float]:
    """One optimisation step; returns the loss terms (and "loss", their weighted sum)."""
    model.train()
    with autocast(batch["hist_len"].device, amp_dtype):
        terms = loss_terms(model(batch), batch.get("label"))
    loss = total_loss(terms, loss_weights(model))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


@torch.inference_mode()
def predict_ranking(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str = "cpu",
                    amp_dtype: torch.dtype | None = None, keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Labels, probabilities, user keys (and any `keep` columns) over all batches."""
    model.eval()
    cols: dict[str, list[np.ndarray]] = {"label": [], "prob": [], "user_key": [], **{k: [] for k in keep}}
    for b in batches:
        b = to_device(b, device)
        with autocast(device, amp_dtype):
            logits = model(b).logits
        cols["prob"].append(torch.sigmoid(logits.float()).cpu().numpy())
        for k in ("label", "user_key", *keep):
            cols[k].append(b[k].cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}


def ranking_metrics(pred: dict[str, np.ndarray], new_user_max_clicks: int | None = None,
                    cold_item_max_clicks: int | None = None) -> dict[str, float]:
    """AUC, GAUC, LogLoss, and AUC per state group when the state columns were kept."""
    y, p = pred["label"], pred["prob"]
    out = {"auc": auc(y, p), "gauc": gauc(y, p, pred["user_key"]), "logloss": logloss(y, p), "n": float(len(y))}
    masks = {}
    if new_user_max_clicks is not None and "user_clicks_before" in pred:
        new = pred["user_clicks_before"] <= new_user_max_clicks
        masks |= {"auc_new_users": new, "auc_old_users": ~new}
    if cold_item_max_clicks is not None and "item_clicks_before" in pred:
        cold = pred["item_clicks_before"] <= cold_item_max_clicks
        masks |= {"auc_cold_items": cold, "auc_hot_items": ~cold}
    out |= group_auc(y, p, masks)
    return out
