"""CDNet: Core-Behaviors and Distributional-Compensation Dual-View Interaction Network (paper 000).

Notation: B batch, L behaviors, D token dim, Db = 3·D a behavior (item ⊕ category ⊕ brand),
S similarity dim, k = ceil(ratio · valid_len) core behaviors (k_max = ceil(ratio · L)),
F context fields, n_bins similarity intervals.

1. Similarity (§3.1): s_j = cos(P e_target, P e_j) ∈ [-1, 1] for every behavior j, with ONE
   shared, bias-free projection P: "the similarity between the feature representation of
   the target item and that of each historical behavior" — the same representation on both
   sides, so a behavior identical to the target scores exactly 1 from the first step (two
   unrelated projections with biases made the cosine a near-constant at init: core
   selection was close to random and the histogram filled one or two bins).
2. Core behaviors (eq. 2–3): the top-k behaviors by s with k = ceil(ratio · valid_len),
   clamped to [1, valid_len]; padding is never selected. Straight-through estimator:
   "in the forward pass, a discrete mask is applied to the sequence ... during the backward
   pass ... we treat the mask as a differentiable probabilistic approximation to ensure that
   model parameters are updated based on all behaviors in the user sequence". The mask is
   m = hard + soft − sg(soft), soft = σ((s − s_(k)) / (τ · spread)), s_(k) the k-th largest
   score and spread the row's std of valid scores (both detached), so τ is relative to the
   row's own score scale. Only the k selected behaviors become tokens (interaction cost
   O((k + 1 + F)²), independent of L); the masked behaviors that are not selected are
   exactly zero in the forward pass and are added to the core tokens as that zero, so in the
   backward pass each of them receives the core tokens' mean gradient through its soft mask:
   the gradient reaches all L behaviors' scores (eq. 3's "all behaviors"), not only the k.
3. Interest distribution (§3.2, eq. 4): counts of s in `bins` equal intervals of
   [-1, 1] over the whole valid sequence, divided by the valid length, embedded
   into one token.
4. Interaction (eq. 5–6): tokens [k core; distribution; F context fields] through
   N pre-LN Transformer layers; the FFN is per token type (PFFN): one shared by all
   core tokens, one for the distribution token, one per context field. MLP head
   over [mean of core tokens; distribution token; context tokens].

Switches: `use_core=False` (CDNet-RCore), `use_distribution=False` (CDNet-RGid),
`full_sequence=True` (all L behaviors as tokens, no selection: the costly variant).

Variant (ours, off by default): `behavior_age=True` adds each behavior's age at the request time
(log2-hour buckets, `models.spec.behavior_age_bucket`) to the core behavior tokens — after the
selection, so the target-behavior similarity that picks them stays the paper's. The paper's
behaviors carry item-side features only and it is silent on time; its tokens interact "with
contextual features", which cannot tell a click of an hour ago from one of last month. Without
it the model cannot separate a user's current interest from their other long-term ones.

Variant (ours, off by default): `category_recency=True` adds one context token: the age bucket of
the user's latest behavior in the target's category (`models.layers.category_recency`, computed from
the batch's `hist_cat_idx`, `cat_idx` and `hist_age_idx`, so training and serving build it alike) —
the recency of the interest the target belongs to, as an explicit input rather than left for the
Transformer to find among the core tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import RankingModel
from models.configs import CDNetConfig
from models.layers import (
    MLP,
    Embedded,
    FieldEmbedding,
    ModelOutput,
    TransformerBlock,
    category_recency,
    masked_mean,
    missing_age,
    trim_history,
)
from models.spec import AGE_BUCKETS, FeatureSpec


def core_counts(valid_len: Tensor, ratio: float) -> Tensor:
    """k per row: ceil(ratio · len) clamped to [1, len]; 0 for an empty history. (B,) int64."""
    k = torch.ceil(valid_len.float() * ratio).long()
    return torch.minimum(k.clamp_min(1), valid_len)


def select_core(sim: Tensor, mask: Tensor, ratio: float, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k behaviors with a straight-through mask.

    sim (B, L), mask (B, L) → idx (B, k_max) positions sorted by score, selected
    (B, k_max) bool (rank < k of the row), ste (B, L): 1.0 at selected positions and 0.0
    elsewhere in the forward pass, d soft in the backward pass at every valid position.
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
    m = mask.to(sim.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1.0)
    mean = (sim * m).sum(1, keepdim=True) / n
    spread = (((sim - mean) * m).pow(2).sum(1, keepdim=True) / n).sqrt().detach().clamp_min(1e-3)  # (B, 1)
    soft = torch.sigmoid((sim - thr) / (tau * spread)) * m
    return idx, selected, hard + soft - soft.detach()


def core_behaviors(seq: Tensor, mask: Tensor, sim: Tensor, ratio: float, tau: float,
                   group: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """seq (B, L, Db), mask (B, L), sim (B, L) → the k_max core slots (B, k_max, Db) (rows past a
    row's k are padding) and their (B, k_max) validity. Forward: exactly the selected behaviors.
    Backward: every valid behavior's soft mask gets a gradient (eq. 3), see the module docstring.
    `group` (B,): seq holds U distinct histories (U, L, Db) and row b's is seq[group[b]]
    (`Embedded.group`; forward only)."""
    idx, selected, ste = select_core(sim, mask, ratio, tau)
    if not (torch.is_grad_enabled() and (seq.requires_grad or ste.requires_grad)):
        # no backward pass (serving, evaluation): the forward values alone — the discrete mask (ste is
        # hard + soft − sg(soft), the hard mask up to rounding) and no spill (0 in the forward pass) —
        # without the two (B, L, Db) products (a sixth of CDNet's serving forward: benchmarks/RESULTS.md)
        if group is not None:  # row b's slot j is behavior idx[b, j] of history group[b]
            U, L, Db = seq.shape
            return seq.reshape(U * L, Db)[group[:, None] * L + idx] * selected.unsqueeze(-1), selected
        return seq.gather(1, idx.unsqueeze(-1).expand(-1, -1, seq.shape[-1])) * selected.unsqueeze(-1), selected
    if group is not None:
        raise ValueError("core_behaviors: shared histories (group) carry no per-row gradient; embed without them")
    masked = seq * ste.unsqueeze(-1)  # (B, L, Db): the discrete mask applied to the sequence
    chosen = masked.gather(1, idx.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))  # (B, k_max, Db)
    rest = torch.ones_like(ste).scatter(1, idx, (~selected).to(ste.dtype))  # (B, L): 1 where not selected
    spill = (masked * rest.unsqueeze(-1)).sum(1, keepdim=True)  # (B, 1, Db): 0 in the forward pass
    n_core = selected.sum(1, keepdim=True).clamp_min(1).unsqueeze(-1)  # (B, 1, 1)
    return chosen + selected.unsqueeze(-1) * spill / n_core, selected


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
        self.embedding = FieldEmbedding(spec, d, cfg.id_dropout, behavior_age=cfg.behavior_age)
        self.proj_sim = nn.Linear(db, cfg.sim_dim, bias=False)  # P: one projection for target and behaviors
        self.behavior_token = nn.Linear(db, d)
        self.dist_token = nn.Linear(cfg.bins, d)
        n_ctx = spec.num_fields + int(cfg.category_recency)  # context fields (+ the recency token)
        self.recency = nn.Embedding(AGE_BUCKETS, d) if cfg.category_recency else None
        if self.recency is not None:
            nn.init.normal_(self.recency.weight, std=0.05)  # the field tables' scale
        n_types = 2 + n_ctx  # core, distribution, one per context field
        self.blocks = nn.ModuleList(
            [TransformerBlock(d, cfg.heads, cfg.ffn_mult, n_types, cfg.dropout) for _ in range(cfg.layers)]
        )
        self.head = MLP(d * (2 + n_ctx), cfg.hidden, 1, cfg.dropout)

    def embed(self, batch: dict[str, Tensor]) -> Embedded:
        """The field embedding of the batch without the left padding that no row needs (`trim_history`):
        with k_max = ceil(ratio · the longest history), the same logits and gradients as at the full
        padding (padding is never selected, never counted in the histogram, and masked in attention),
        at a cost set by the clicks the batch holds, not by L.

        A served batch says which rows share one history (`hist_group`: a request's candidates); without
        a backward pass the history side (lookup, similarity projection and normalisation) is then
        computed once per history, not once per candidate (`Embedded.group`), with the same logits."""
        return self.embedding(trim_history(batch), shared_history=True)

    def similarity(self, emb: Embedded) -> Tensor:
        """(B, L) cosine similarity of the target to every behavior (0 at padding)."""
        q = F.normalize(self.proj_sim(emb.target()), dim=-1)  # (B, S)
        k = F.normalize(self.proj_sim(emb.seq), dim=-1)  # (B | U, L, S)
        if emb.group is None:
            sim = torch.einsum("bs,bls->bl", q, k)
        elif k.shape[0] == 1:  # one history for every row: one (B, S) × (S, L) product
            sim = q @ k[0].T
        else:
            sim = torch.einsum("bs,bls->bl", q, k[emb.group])
        return sim * emb.seq_mask

    def core_tokens(self, emb: Embedded, sim: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T_core, D) behavior tokens and (B, T_core) padding flags."""
        seq = emb.seq if emb.seq_age is None else emb.seq + emb.seq_age  # (B | U, L, Db); the age never enters sim
        if self.cfg.full_sequence:
            return emb.row_seq(self.behavior_token(seq)), ~emb.seq_mask
        chosen, selected = core_behaviors(seq, emb.seq_mask, sim, self.cfg.topk_ratio, self.cfg.tau, emb.group)
        return self.behavior_token(chosen), ~selected  # (B, k_max, D)

    def tokens(self, emb: Embedded) -> tuple[Tensor, Tensor, Tensor, dict[str, int]]:
        """Interaction input: tokens (B, T, D), padding (B, T), token types (T,), and the
        layout {"core": n, "distribution": 0|1, "context": F} with T = their sum."""
        B = emb.fields.shape[0]
        sim = self.similarity(emb)
        tokens, pads, types = [], [], []
        fields = emb.fields
        if self.recency is not None:
            if emb.seq_age_idx is None:
                raise missing_age("CDNet(category_recency=True)")
            rec = category_recency(emb.seq_cat, emb.target_cat, emb.seq_age_idx, emb.seq_mask)
            fields = torch.cat([fields, self.recency(rec).unsqueeze(1)], 1)  # (B, F + 1, D)
        layout = {"core": 0, "distribution": 0, "context": fields.shape[1]}
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
        tokens.append(fields)
        pads.append(torch.zeros(B, n_f, dtype=torch.bool, device=fields.device))
        types.append(2 + torch.arange(n_f))
        return torch.cat(tokens, 1), torch.cat(pads, 1), torch.cat(types).to(emb.fields.device), layout

    def interact(self, emb: Embedded) -> ModelOutput:
        """fields (B, F, D), behaviors (B, L, Db) → logits (B,); T = k_max + 1 + F tokens through the Transformer."""
        x, pad, ty, layout = self.tokens(emb)  # (B, T, D), T = k_max + 1 + F
        # no token absent in any row (one user's request: every row holds the same k core behaviors):
        # attention without the mask, the same numbers without a masked fill per layer
        attn_pad = pad if bool(pad.any()) else None
        for blk in self.blocks:
            x = blk(x, attn_pad, ty)
        B, d, n_core = x.shape[0], self.cfg.embed_dim, layout["core"]
        core_out = masked_mean(x[:, :n_core], ~pad[:, :n_core]) if n_core else x.new_zeros(B, d)
        dist_out = x[:, n_core] if layout["distribution"] else x.new_zeros(B, d)
        ctx_out = x[:, n_core + layout["distribution"]:].flatten(1)
        return ModelOutput(self.head(torch.cat([core_out, dist_out, ctx_out], -1)).squeeze(-1))
