"""The split every ranking model follows: `embed(batch) -> Embedded`, then
`interact(emb) -> ModelOutput` (logits (B,) plus the model's named aux terms);
`forward(batch) -> ModelOutput`. AdaF2M2 wraps any model with that split (it re-weights
and masks `Embedded.fields` and the behaviors) and keeps the wrapped model's aux terms."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput


class RankingModel(nn.Module):
    """Base class: embedding → interaction → logit."""

    embedding: FieldEmbedding

    def embed(self, batch: dict[str, Tensor]) -> Embedded:
        return self.embedding(batch)

    def interact(self, emb: Embedded) -> ModelOutput:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        return self.interact(self.embed(batch))

    def output_layer(self) -> nn.Linear:
        """The last linear layer, whose (1,) bias is the logit's offset: `self.head`, else `self.mlp`."""
        head = getattr(self, "head", None) or self.mlp
        last = head.net[-1] if isinstance(head, MLP) else head
        if not (isinstance(last, nn.Linear) and last.out_features == 1 and last.bias is not None):
            raise TypeError(f"{type(self).__name__}: the output layer is not a Linear(·, 1) with a bias")
        return last

    def init_output_bias(self, rate: float) -> None:
        """Start the logit at logit(rate), the train positive rate, instead of p = 0.5 (a 9.6%-positive
        split otherwise spends its first steps learning the base rate)."""
        with torch.no_grad():
            self.output_layer().bias.fill_(math.log(rate / (1.0 - rate)))
