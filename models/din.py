"""DIN (Zhou et al., 2018): target attention over the short or the long behavior sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.base import RankingModel
from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput, TargetAttention, short_view
from models.spec import FeatureSpec


@dataclass
class DINConfig:
    embed_dim: int = 16
    id_dropout: float = 0.2  # user/item id → OOV in training (models.layers.FieldEmbedding)
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    attention_hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    sequence: str = "short"  # "short" (last short_len behaviors) | "long" (all L)
    attention_norm: str = "softmax"  # "softmax" | "none" (the DIN paper's unnormalised weights)

    @classmethod
    def tiny(cls) -> DINConfig:
        return cls(embed_dim=8, hidden=[32], attention_hidden=[16])


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
