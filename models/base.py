"""The split every ranking model follows: `embed(batch) -> Embedded`, then
`interact(emb) -> logits (B,)`; `forward(batch) -> ModelOutput`. AdaF2M2 wraps any
model with that split (it re-weights and masks `Embedded.fields`)."""

from __future__ import annotations

from torch import Tensor, nn

from models.layers import Embedded, FieldEmbedding, ModelOutput


class RankingModel(nn.Module):
    """Base class: embedding → interaction → logit."""

    embedding: FieldEmbedding

    def embed(self, batch: dict[str, Tensor]) -> Embedded:
        return self.embedding(batch)

    def interact(self, emb: Embedded) -> Tensor:  # (B,)
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        return ModelOutput(self.interact(self.embed(batch)))
