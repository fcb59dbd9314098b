"""DCN-V2 (Wang et al., 2021): cross network ‖ deep network over the field embeddings."""

from __future__ import annotations

import torch
from torch import nn

from models.base import RankingModel
from models.configs import DCNv2Config
from models.layers import (
    MLP,
    CrossLayerV2,
    Embedded,
    FieldEmbedding,
    ModelOutput,
    TargetAttention,
    masked_mean,
)
from models.spec import FeatureSpec


class DCNv2(RankingModel):
    """DCN-V2 (Wang et al., 2021), parallel form: x0 = fields ⊕ pooled behaviors;
    cross network (eq. 1) ‖ deep MLP → logit from their concatenation."""

    Config = DCNv2Config

    def __init__(self, spec: FeatureSpec, cfg: DCNv2Config):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.embedding = FieldEmbedding(spec, cfg.embed_dim, cfg.id_dropout)
        db = 3 * cfg.embed_dim
        d0 = spec.num_fields * cfg.embed_dim + db
        self.attention = TargetAttention(db) if cfg.sequence == "din" else None
        self.cross = nn.ModuleList([CrossLayerV2(d0, cfg.cross_rank or None) for _ in range(cfg.cross_layers)])
        self.deep = MLP(d0, cfg.hidden, None, cfg.dropout)
        self.head = nn.Linear(d0 + self.deep.d_out, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """With the mean slot (sequence="mean") the behaviors are pooled at lookup
        (`FieldEmbedding(pooled_only=True)`); `embed` still returns them whole for wrappers
        that reweight them (AdaF2M2)."""
        return self.interact(self.embedding(batch, pooled_only=self.attention is None))

    def interact(self, emb: Embedded) -> ModelOutput:
        """fields (B, F, D), behaviors (B, L, Db) → logits (B,); x0 = fields ⊕ pooled behaviors (B, F·D + Db)."""
        if emb.pooled is not None:
            pooled = emb.pooled
        elif self.attention is not None:
            pooled = self.attention(emb.target(), emb.seq, emb.seq_mask)
        else:
            pooled = masked_mean(emb.seq, emb.seq_mask)
        x0 = torch.cat([emb.fields.flatten(1), pooled], -1)  # (B, F·D + Db)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return ModelOutput(self.head(torch.cat([x, self.deep(x0)], -1)).squeeze(-1))
