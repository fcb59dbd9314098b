"""Losses, computed apart from the models (the training step calls these)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from models.layers import ModelOutput


def loss_terms(out: ModelOutput, labels: Tensor | None = None) -> dict[str, Tensor]:
    """Named loss terms: "main" = BCE of the serving logits; each `aux` term as returned;
    each `aux_logits` entry (B, k) as BCE against the label of the sample it was made from,
    summed over the k copies and averaged over the batch (AdaF2M2 eq. 5: Σ_{i=1..k})."""
    if out.main_loss is not None:
        terms = {"main": out.main_loss}
        terms.update(out.aux)
        return terms
    y = labels.float()
    terms = {"main": F.binary_cross_entropy_with_logits(out.logits.float(), y)}
    terms.update(out.aux)
    for name, lg in out.aux_logits.items():
        bce = F.binary_cross_entropy_with_logits(lg.float(), y.unsqueeze(-1).expand_as(lg), reduction="none")
        terms[name] = bce.sum(-1).mean()
    return terms


def total_loss(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """main + Σ weight · term; a term without a weight is an error, not a silent 1.0."""
    missing = [n for n in terms if n != "main" and n not in weights]
    if missing:
        raise KeyError(f"no loss weight for aux term(s) {missing}; the model's loss_weights() must name them")
    return terms["main"] + sum(weights[n] * t for n, t in terms.items() if n != "main")
