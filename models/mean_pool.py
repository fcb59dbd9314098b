"""Mean-pool DNN: the simplest sequence baseline (Covington et al.-style average of behaviors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.base import RankingModel
from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput, masked_mean, short_view
from models.spec import FeatureSpec


@dataclass
class MeanPoolConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    use_long: bool = True

    @classmethod
    def tiny(cls) -> MeanPoolConfig:
        return cls(embed_dim=8, hidden=[32])


class MeanPoolDNN(RankingModel):
    """Fields ⊕ target ⊕ masked mean of the behaviors → MLP."""

    Config = MeanPoolConfig

    def __init__(self, spec: FeatureSpec, cfg: MeanPoolConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.embedding = FieldEmbedding(spec, cfg.embed_dim, cfg.id_dropout)
        db = 3 * cfg.embed_dim
        self.mlp = MLP(spec.num_fields * cfg.embed_dim + db, cfg.hidden, 1, cfg.dropout)

    def interact(self, emb: Embedded) -> ModelOutput:
        """fields (B, F, D), behaviors (B, L, Db) → logits (B,) via the masked mean of behaviors."""
        seq, mask = (emb.seq, emb.seq_mask) if self.cfg.use_long else short_view(emb, self.spec.short_len)
        pooled = masked_mean(seq, mask)  # (B, Db)
        return ModelOutput(self.mlp(torch.cat([emb.fields.flatten(1), pooled], -1)).squeeze(-1))
