"""CDNet: Core-Behaviors and Distributional-Compensation Dual-View Interaction Network (paper 000).

Notation: B batch, L behaviors, D token dim, Db = 3·D a behavior (item ⊕ category ⊕ brand),
S similarity dim, k = ceil(ratio · valid_len) core behaviors (k_max = ceil(ratio · L)),
F context fields, n_bins similarity intervals.

1. Similarity (§3.1): s_j = cos(P_t e_target, P_b e_j) ∈ [-1, 1] for every behavior j.
2. Core behaviors (eq. 2–3): the top-k behaviors by s with k = ceil(ratio · valid_len),
   clamped to [1, valid_len]; padding is never selected. Straight-through estimator:
   forward uses the hard 0/1 top-k mask, backward the gradient of a soft score,
   mask = hard + soft − sg(soft) with soft = σ((s − s_(k)) / τ), s_(k) the k-th
   largest score (detached) — our reading of "a differentiable probabilistic
   approximation" of the mask, whose equation was lost in extraction. Only the
   k selected behaviors become tokens, so the interaction cost is O((k + 1 + F)²),
   independent of L; the gradient reaches the similarity projections through the
   selected behaviors' soft scores.
3. Interest distribution (§3.2, eq. 4): counts of s in `bins` equal intervals of
   [-1, 1] over the whole valid sequence, divided by the valid length, embedded
   into one token.
4. Interaction (eq. 5–6): tokens [k core; distribution; F context fields] through
   N pre-LN Transformer layers; the FFN is per token type (PFFN): one shared by all
   core tokens, one for the distribution token, one per context field. MLP head
   over [mean of core tokens; distribution token; context tokens].

Switches: `use_core=False` (CDNet-RCore), `use_distribution=False` (CDNet-RGid),
`full_sequence=True` (all L behaviors as tokens, no selection: the costly variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import RankingModel
from models.layers import MLP, Embedded, FieldEmbedding, TransformerBlock, masked_mean
from models.spec import FeatureSpec


@dataclass
class CDNetConfig:
    embed_dim: int = 16
    sim_dim: int = 32
    topk_ratio: float = 0.1
    bins: int = 10
    layers: int = 2
    heads: int = 2
    ffn_mult: int = 2
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    tau: float = 0.1  # temperature of the soft mask used by the STE backward
    use_core: bool = True
    use_distribution: bool = True
    full_sequence: bool = False

    def __post_init__(self):
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")

    @classmethod
    def tiny(cls) -> CDNetConfig:
        return cls(embed_dim=8, sim_dim=8, topk_ratio=0.5, bins=4, layers=1, heads=2, hidden=[16])


def core_counts(valid_len: Tensor, ratio: float) -> Tensor:
    """k per row: ceil(ratio · len) clamped to [1, len]; 0 for an empty history. (B,) int64."""
    k = torch.ceil(valid_len.float() * ratio).long()
    return torch.minimum(k.clamp_min(1), valid_len)


def select_core(sim: Tensor, mask: Tensor, ratio: float, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k behaviors with a straight-through mask.

    sim (B, L), mask (B, L) → idx (B, k_max) positions sorted by score, selected
    (B, k_max) bool (rank < k of the row), ste (B, L): 1.0 at selected positions in
    the forward pass, d soft in the backward pass.
    """
    L = sim.shape[1]
    k = core_counts(mask.sum(1), ratio)  # (B,)
    k_max = max(1, math.ceil(ratio * L))
    scores = sim.masked_fill(~mask, float("-inf"))
    top_val, idx = scores.topk(k_max, dim=1)  # (B, k_max)
    selected = torch.arange(k_max, device=sim.device)[None, :] < k[:, None]
    hard = torch.zeros_like(sim).scatter(1, idx, selected.to(sim.dtype))  # (B, L)
    thr = top_val.gather(1, (k - 1).clamp_min(0)[:, None]).detach()  # the k-th largest score
    thr = torch.where(torch.isfinite(thr), thr, torch.zeros_like(thr))
    soft = torch.sigmoid((sim - thr) / tau) * mask
    return idx, selected, hard + soft - soft.detach()


def interest_histogram(sim: Tensor, mask: Tensor, bins: int) -> Tensor:
    """(B, bins) counts of valid similarities per equal interval of [-1, 1] (eq. 4)."""
    b = ((sim.detach() + 1.0) * 0.5 * bins).floor().long().clamp(0, bins - 1)  # (B, L)
    return (F.one_hot(b, bins).to(sim.dtype) * mask.unsqueeze(-1).to(sim.dtype)).sum(1)


class CDNet(RankingModel):
    Config = CDNetConfig

    def __init__(self, spec: FeatureSpec, cfg: CDNetConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        d, db = cfg.embed_dim, 3 * cfg.embed_dim
        self.embedding = FieldEmbedding(spec, d)
        self.proj_target = nn.Linear(db, cfg.sim_dim)
        self.proj_behavior = nn.Linear(db, cfg.sim_dim)
        self.behavior_token = nn.Linear(db, d)
        self.dist_token = nn.Linear(cfg.bins, d)
        n_types = 2 + spec.num_fields  # core, distribution, one per context field
        self.blocks = nn.ModuleList(
            [TransformerBlock(d, cfg.heads, cfg.ffn_mult, n_types, cfg.dropout) for _ in range(cfg.layers)]
        )
        self.head = MLP(d * (2 + spec.num_fields), cfg.hidden, 1, cfg.dropout)

    def similarity(self, emb: Embedded) -> Tensor:
        """(B, L) cosine similarity of the target to every behavior (0 at padding)."""
        q = F.normalize(self.proj_target(emb.target()), dim=-1)  # (B, S)
        k = F.normalize(self.proj_behavior(emb.seq), dim=-1)  # (B, L, S)
        return torch.einsum("bs,bls->bl", q, k) * emb.seq_mask

    def core_tokens(self, emb: Embedded, sim: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T_core, D) behavior tokens and (B, T_core) padding flags."""
        if self.cfg.full_sequence:
            return self.behavior_token(emb.seq), ~emb.seq_mask
        idx, selected, ste = select_core(sim, emb.seq_mask, self.cfg.topk_ratio, self.cfg.tau)
        chosen = emb.seq.gather(1, idx.unsqueeze(-1).expand(-1, -1, emb.seq.shape[-1]))  # (B, k_max, Db)
        chosen = chosen * ste.gather(1, idx).unsqueeze(-1)  # ×1 forward; carries d soft backward
        return self.behavior_token(chosen), ~selected

    def tokens(self, emb: Embedded) -> tuple[Tensor, Tensor, Tensor, dict[str, int]]:
        """Interaction input: tokens (B, T, D), padding (B, T), token types (T,), and the
        layout {"core": n, "distribution": 0|1, "context": F} with T = their sum."""
        B = emb.fields.shape[0]
        sim = self.similarity(emb)
        tokens, pads, types = [], [], []
        layout = {"core": 0, "distribution": 0, "context": emb.fields.shape[1]}
        if self.cfg.use_core or self.cfg.full_sequence:
            core, core_pad = self.core_tokens(emb, sim)
            tokens.append(core)
            pads.append(core_pad)
            types.append(torch.zeros(core.shape[1], dtype=torch.long))
            layout["core"] = core.shape[1]
        if self.cfg.use_distribution:
            hist = interest_histogram(sim, emb.seq_mask, self.cfg.bins)
            hist = hist / emb.seq_mask.sum(1, keepdim=True).clamp_min(1)
            tokens.append(self.dist_token(hist).unsqueeze(1))  # (B, 1, D)
            pads.append(torch.zeros(B, 1, dtype=torch.bool, device=hist.device))
            types.append(torch.ones(1, dtype=torch.long))
            layout["distribution"] = 1
        n_f = layout["context"]
        tokens.append(emb.fields)
        pads.append(torch.zeros(B, n_f, dtype=torch.bool, device=emb.fields.device))
        types.append(2 + torch.arange(n_f))
        return torch.cat(tokens, 1), torch.cat(pads, 1), torch.cat(types).to(emb.fields.device), layout

    def interact(self, emb: Embedded) -> Tensor:
        """fields (B, F, D), behaviors (B, L, Db) → logits (B,); T = k_max + 1 + F tokens through the Transformer."""
        x, pad, ty, layout = self.tokens(emb)  # (B, T, D), T = k_max + 1 + F
        for blk in self.blocks:
            x = blk(x, pad, ty)
        B, d, n_core = x.shape[0], self.cfg.embed_dim, layout["core"]
        core_out = masked_mean(x[:, :n_core], ~pad[:, :n_core]) if n_core else x.new_zeros(B, d)
        dist_out = x[:, n_core] if layout["distribution"] else x.new_zeros(B, d)
        ctx_out = x[:, n_core + layout["distribution"]:].flatten(1)
        return self.head(torch.cat([core_out, dist_out, ctx_out], -1)).squeeze(-1)
