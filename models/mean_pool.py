"""Mean-pool DNN: the simplest sequence baseline (Covington et al.-style average of behaviors)."""

from __future__ import annotations

import torch

from models.base import RankingModel
from models.configs import MeanPoolConfig
from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput, masked_mean, short_view
from models.spec import FeatureSpec


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
