"""AdaF2M2: Adaptive Feature Modeling with Feature Mask (paper 002), a wrapper over any
ranking model split into `embed` and `interact` (here DCNv2, DLF, CDNet, DIN, mean-pool, LREA).

Notation: B batch, F fields, D dim, L behaviors, Db behavior dim, k augmented copies per
sample, F' = F + 1 features (the F field tokens and the behavior sequence).

The features are the F field tokens and the behavior sequence: the paper counts the
"ID sequences of interactions" among the ID-based features models over-rely on (abstract,
§1) and weighs "like sequence, finish sequence" in its adapter heatmaps (§4.5), so the
sequence is one feature of its own — one [MASK] embedding (Db) that replaces every
behavior of a masked copy, and one adapter weight that scales every behavior.

- Feature mask (§3.2, eqs. 3–5): for each sample draw k values p ~ U[β, γ]; in copy j
  each feature is replaced by that feature's own learnable [MASK] embedding ("the default
  mask embedding of each feature is different") with probability p_j. The base model
  predicts every copy WITHOUT the adapter weights (the adapter "has no influence on the
  multi-forward training", §3.3), and L_aux = Σ_{i=1..k} BCE of those predictions against
  the sample's own label (eq. 5 sums over the k copies; models/losses.py). The copies are
  returned sample-major as `aux_logits["feature_mask"]` (B, k): column j of row b is a copy
  of sample b, so its label is labels[b].
- State-aware adapter (§3.3, eq. 8): w = σ(h([r_active, r_ID, r_norm, r_count])) with
  r_active = log1p of the user's active days in the last 7/30 days, r_ID = the user and
  item ID embeddings, r_norm = log/sqrt/square of their norms, r_count = log1p of the
  user's and the item's interaction counts. The main path feeds w_i · v_i (eq. 6) for the
  F' features. The adapter reads the ID embeddings through a stop-gradient: it learns to
  weigh features by state, it does not steer what the ID embeddings learn.
- L = L_main + α · L_aux (eq. 13), α in `loss_weights()`; the wrapped model's own aux terms
  (LREA's non-negativity) pass through with their weights. k = 1 by default, as in the
  paper's offline runs. In eval mode only the main path runs: serving costs one adapter MLP
  more than the base model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import RankingModel
from models.configs import AdaF2M2Config
from models.layers import MLP, Embedded, ModelOutput
from models.spec import FeatureSpec


class StateAdapter(nn.Module):
    """h: state signals → one sigmoid weight per feature (eq. 8): (B, F') in (0, 1)."""

    def __init__(self, spec: FeatureSpec, d: int, n_features: int, hidden: list[int], id_fields: tuple[str, ...]):
        super().__init__()
        self.spec, self.id_fields = spec, id_fields
        self.id_index = [spec.fields.index(f) for f in id_fields]
        n_ids = len(id_fields)
        self.h = MLP(2 + n_ids * d + 3 * n_ids + 2, hidden, n_features)

    def state(self, batch: dict[str, Tensor], fields: Tensor) -> Tensor:
        """(B, S) the concatenated state signals [r_active, r_ID, r_norm, r_count]."""
        st = self.spec.state
        f = lambda name: torch.log1p(batch[st[name]].float().clamp_min(0)).unsqueeze(-1)  # noqa: E731
        ids = fields[:, self.id_index].detach()  # (B, n_ids, D)
        norm = ids.norm(dim=-1)  # (B, n_ids)
        r_norm = torch.cat([torch.log(norm + 1e-6), torch.sqrt(norm), norm**2], -1)
        return torch.cat([f("active_7"), f("active_30"), ids.flatten(1), r_norm, f("user_count"), f("item_count")], -1)

    def forward(self, batch: dict[str, Tensor], fields: Tensor) -> Tensor:
        return torch.sigmoid(self.h(self.state(batch, fields)))


class AdaF2M2(nn.Module):
    Config = AdaF2M2Config

    def __init__(self, base: RankingModel, spec: FeatureSpec, cfg: AdaF2M2Config):
        super().__init__()
        self.base, self.spec, self.cfg = base, spec, cfg
        d = base.embedding.dim
        n_fields = spec.num_fields
        self.mask_embedding = nn.Parameter(torch.randn(n_fields, d) * 0.05)  # one [MASK] per field
        self.seq_mask_embedding = nn.Parameter(torch.randn(3 * d) * 0.05)  # the sequence's [MASK] (Db)
        self.adapter = StateAdapter(spec, d, n_fields + 1, cfg.adapter_hidden, spec.id_fields)

    def loss_weights(self) -> dict[str, float]:
        base = self.base.loss_weights() if hasattr(self.base, "loss_weights") else {}
        return base | {"feature_mask": self.cfg.alpha}

    def field_weights(self, batch: dict[str, Tensor], emb: Embedded) -> Tensor:
        """(B, F') adapter weights: one per field token, the last for the behavior sequence."""
        return self.adapter(batch, emb.fields)

    def adapted(self, batch: dict[str, Tensor], emb: Embedded) -> Embedded:
        """eq. 6: w_i · v_i for every field token and for the behaviors."""
        w = self.field_weights(batch, emb)  # (B, F')
        return emb.with_fields(emb.fields * w[:, :-1].unsqueeze(-1), emb.seq * w[:, -1:, None])

    def masked_copies(self, emb: Embedded) -> tuple[Embedded, Tensor]:
        """k masked copies per sample, sample-major: row b·k + j is copy j of sample b.
        Returns the copies and the (B, k, F') replacement mask (last column: the sequence)."""
        B, n_f, d = emb.fields.shape
        k = self.cfg.k
        p = torch.empty(B, k, 1, device=emb.fields.device).uniform_(self.cfg.beta, self.cfg.gamma)
        drop = torch.rand(B, k, n_f + 1, device=emb.fields.device) < p  # (B, k, F')
        copies = torch.where(drop[..., :n_f, None], self.mask_embedding, emb.fields.unsqueeze(1))  # (B, k, F, D)
        seq = emb.seq.unsqueeze(1)  # (B, 1, L, Db)
        seq = torch.where(drop[..., n_f, None, None], self.seq_mask_embedding, seq)  # (B, k, L, Db)
        seq = seq * emb.seq_mask[:, None, :, None].to(seq.dtype)  # padding stays zero
        return emb.repeat_interleave(copies.reshape(B * k, n_f, d), k, seq.reshape(B * k, *emb.seq.shape[1:])), drop

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        emb = self.base.embed(batch)
        out = self.base.interact(self.adapted(batch, emb))  # the main path keeps the base model's aux terms
        if not self.training:
            return ModelOutput(out.logits, aux=out.aux)
        copies, _ = self.masked_copies(emb)
        aux = self.base.interact(copies).logits.view(-1, self.cfg.k)  # (B, k), no adapter
        return ModelOutput(out.logits, aux=out.aux, aux_logits=out.aux_logits | {"feature_mask": aux})
