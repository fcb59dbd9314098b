"""AdaF2M2: Adaptive Feature Modeling with Feature Mask (paper 002), a wrapper over any
ranking model split into `embed` and `interact` (here DCNv2, DLF, CDNet, DIN, mean-pool).

Notation: B batch, F fields, D dim, k augmented copies per sample.

- Feature mask (§3.2, eqs. 3–5): for each sample draw k values p ~ U[β, γ]; in copy j
  each field's embedding is replaced by that field's own learnable [MASK] embedding
  with probability p_j. The base model predicts every copy WITHOUT the adapter
  weights (the adapter "has no influence on the multi-forward training", §3.3), and
  L_aux = BCE of those predictions against the sample's own label. The copies are
  returned sample-major as `aux_logits["feature_mask"]` (B, k): column j of row b is
  a copy of sample b, so its label is labels[b] — a layout that cannot misalign
  (a public port tiles the batch k times but repeats each label k times).
- State-aware adapter (§3.3, eq. 8): w = σ(h([r_active, r_ID, r_norm, r_count])) with
  r_active = log1p of the user's active days in the last 7/30 days, r_ID = the user and
  item ID embeddings, r_norm = log/sqrt/square of their norms, r_count = log1p of the
  user's and the item's interaction counts. The main path feeds w_i · v_i (eq. 6).
  The adapter reads the ID embeddings through a stop-gradient: it learns to weigh
  features by state, it does not steer what the ID embeddings learn.
- L = L_main + α · L_aux (eq. 13), α in `loss_weights()`. In eval mode only the main
  path runs: serving costs one adapter MLP more than the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.base import RankingModel
from models.layers import MLP, Embedded, ModelOutput
from models.spec import FeatureSpec


@dataclass
class AdaF2M2Config:
    k: int = 2
    beta: float = 0.1
    gamma: float = 0.5
    alpha: float = 0.2
    adapter_hidden: list[int] = field(default_factory=lambda: [64])

    def __post_init__(self):
        if not 0.0 <= self.beta <= self.gamma <= 1.0:
            raise ValueError(f"need 0 <= beta <= gamma <= 1, got beta={self.beta}, gamma={self.gamma}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    @classmethod
    def tiny(cls) -> AdaF2M2Config:
        return cls(k=2, adapter_hidden=[16])


class StateAdapter(nn.Module):
    """h: state signals → one sigmoid weight per field (eq. 8)."""

    def __init__(self, spec: FeatureSpec, d: int, n_fields: int, hidden: list[int], id_fields: tuple[str, ...]):
        super().__init__()
        self.spec, self.id_fields = spec, id_fields
        self.id_index = [spec.fields.index(f) for f in id_fields]
        n_ids = len(id_fields)
        self.h = MLP(2 + n_ids * d + 3 * n_ids + 2, hidden, n_fields)

    def state(self, batch: dict[str, Tensor], fields: Tensor) -> Tensor:
        """(B, S) the concatenated state signals [r_active, r_ID, r_norm, r_count]."""
        st = self.spec.state
        f = lambda name: torch.log1p(batch[st[name]].float().clamp_min(0)).unsqueeze(-1)  # noqa: E731
        ids = fields[:, self.id_index].detach()  # (B, n_ids, D)
        norm = ids.norm(dim=-1)  # (B, n_ids)
        r_norm = torch.cat([torch.log(norm + 1e-6), torch.sqrt(norm), norm**2], -1)
        return torch.cat([f("active_7"), f("active_30"), ids.flatten(1), r_norm, f("user_count"), f("item_count")], -1)

    def forward(self, batch: dict[str, Tensor], fields: Tensor) -> Tensor:
        return torch.sigmoid(self.h(self.state(batch, fields)))  # (B, F) in (0, 1)


class AdaF2M2(nn.Module):
    Config = AdaF2M2Config

    def __init__(self, base: RankingModel, spec: FeatureSpec, cfg: AdaF2M2Config):
        super().__init__()
        self.base, self.spec, self.cfg = base, spec, cfg
        d = base.embedding.dim
        n_fields = spec.num_fields
        self.mask_embedding = nn.Parameter(torch.randn(n_fields, d) * 0.05)  # one [MASK] per field
        self.adapter = StateAdapter(spec, d, n_fields, cfg.adapter_hidden, spec.id_fields)

    def loss_weights(self) -> dict[str, float]:
        return {"feature_mask": self.cfg.alpha}

    def field_weights(self, batch: dict[str, Tensor], emb: Embedded) -> Tensor:
        return self.adapter(batch, emb.fields)

    def masked_copies(self, emb: Embedded) -> tuple[Embedded, Tensor]:
        """k masked copies per sample, sample-major: row b·k + j is copy j of sample b.
        Returns the copies and the (B, k, F) replacement mask."""
        B, n_f, d = emb.fields.shape
        k = self.cfg.k
        p = torch.empty(B, k, 1, device=emb.fields.device).uniform_(self.cfg.beta, self.cfg.gamma)
        drop = torch.rand(B, k, n_f, device=emb.fields.device) < p  # (B, k, F)
        copies = torch.where(drop.unsqueeze(-1), self.mask_embedding, emb.fields.unsqueeze(1))  # (B, k, F, D)
        return emb.repeat_interleave(copies.reshape(B * k, n_f, d), k), drop

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        emb = self.base.embed(batch)
        w = self.field_weights(batch, emb)  # (B, F)
        logits = self.base.interact(emb.with_fields(emb.fields * w.unsqueeze(-1)))  # eq. 6
        if not self.training:
            return ModelOutput(logits)
        copies, _ = self.masked_copies(emb)
        aux = self.base.interact(copies).view(-1, self.cfg.k)  # (B, k), no adapter
        return ModelOutput(logits, aux_logits={"feature_mask": aux})
