"""DIN (Zhou et al., 2018): target attention over the short or the long behavior sequence."""

from __future__ import annotations

import torch

from models.base import RankingModel
from models.configs import DINConfig
from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput, TargetAttention, short_view
from models.spec import FeatureSpec


class DIN(RankingModel):
    """Deep Interest Network (Zhou et al., 2018): target attention over the short or long sequence."""

    Config = DINConfig

    def __init__(self, spec: FeatureSpec, cfg: DINConfig):
        super().__init__()
        if cfg.sequence not in ("short", "long"):
            raise ValueError(f"DIN sequence must be 'short' or 'long', got {cfg.sequence!r}")
        self.spec, self.cfg = spec, cfg
        self.embedding = FieldEmbedding(spec, cfg.embed_dim, cfg.id_dropout)
        db = 3 * cfg.embed_dim
        self.attention = TargetAttention(db, cfg.attention_hidden, cfg.attention_norm)
        self.mlp = MLP(spec.num_fields * cfg.embed_dim + db, cfg.hidden, 1, cfg.dropout)

    def interact(self, emb: Embedded) -> ModelOutput:
        """fields (B, F, D), behaviors (B, L, Db) → logits (B,); attention over the last short_len or all L."""
        seq, mask = (emb.seq, emb.seq_mask) if self.cfg.sequence == "long" else short_view(emb, self.spec.short_len)
        interest = self.attention(emb.target(), seq, mask)  # (B, Db)
        return ModelOutput(self.mlp(torch.cat([emb.fields.flatten(1), interest], -1)).squeeze(-1))
