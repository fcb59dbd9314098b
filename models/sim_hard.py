"""SIM hard search (Pi et al., 2020), the long-sequence baseline LREA claims to beat:
from the long sequence keep the k most recent behaviors that share the target's
category (the "hard" search of the General Search Unit), then DIN target attention
over them.

Notation: B batch, L behaviors, k kept, Db = 3·D behavior dim, F fields.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.base import RankingModel
from models.configs import SIMHardConfig
from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput, TargetAttention
from models.spec import FeatureSpec


def hard_search(hist_cat: Tensor, mask: Tensor, target_cat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices (B, k) of the k most recent valid behaviors with the target's category,
    and (B, k) validity. Left-padded layout: larger position = more recent."""
    L = hist_cat.shape[1]
    hit = mask & (hist_cat == target_cat.unsqueeze(1))  # (B, L)
    pos = torch.arange(L, device=hist_cat.device).expand_as(hit)
    key = torch.where(hit, pos, torch.full_like(pos, -1))
    val, idx = key.topk(min(k, L), dim=1)  # most recent first
    return idx, val >= 0


class SIMHard(RankingModel):
    Config = SIMHardConfig

    def __init__(self, spec: FeatureSpec, cfg: SIMHardConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.embedding = FieldEmbedding(spec, cfg.embed_dim, cfg.id_dropout)
        db = 3 * cfg.embed_dim
        self.attention = TargetAttention(db, cfg.attention_hidden)
        self.mlp = MLP(spec.num_fields * cfg.embed_dim + db, cfg.hidden, 1, cfg.dropout)

    def interact(self, emb: Embedded) -> ModelOutput:
        """fields (B, F, D), behaviors (B, L, Db) + their category ids → logits (B,); attention over k ≤ L."""
        idx, ok = hard_search(emb.seq_cat, emb.seq_mask, emb.target_cat, self.cfg.k)
        kept = emb.seq.gather(1, idx.unsqueeze(-1).expand(-1, -1, emb.seq.shape[-1]))  # (B, k, Db)
        interest = self.attention(emb.target(), kept, ok)
        return ModelOutput(self.mlp(torch.cat([emb.fields.flatten(1), interest], -1)).squeeze(-1))
