"""Shared blocks: field embeddings, MLP, DIN target attention, DCNv2 cross layer, Transformer block.

Notation used across models/: B batch, L behavior-sequence length, F fields,
D embedding dim, Db = 3·D a behavior (item ⊕ category ⊕ brand), k core behaviors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.spec import ITEM_FIELDS, SEQ_FIELDS, FeatureSpec


@dataclass
class ModelOutput:
    """What every model returns.

    logits:      (B,) click logits of the serving path.
    aux:         named scalar loss terms that need no labels (e.g. LREA's non-negativity).
    aux_logits:  named (B, k) logits of auxiliary predictions on augmented copies of each
                 sample, sample-major: column j of row b belongs to sample b, so its label
                 is labels[b] (AdaF2M2's masked forwards).
    main_loss:   set by models whose main objective is not BCE on `logits` (retrieval:
                 KARMA's action loss, the two-tower's sampled softmax); then logits are scores.
    """

    logits: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    aux_logits: dict[str, Tensor] = field(default_factory=dict)
    main_loss: Tensor | None = None


@dataclass
class Embedded:
    """A batch after the embedding layer.

    fields: (B, F, D) one token per field, in `FeatureSpec.fields` order.
    seq:    (B, L, Db) behaviors, left-padded; seq_mask (B, L) True at valid positions.
    """

    fields: Tensor
    seq: Tensor
    seq_mask: Tensor
    target_index: tuple[int, ...]  # positions of item_idx, cat_idx, brand_idx in `fields`
    seq_cat: Tensor | None = None  # (B, L) the behaviors' category ids (search keys, e.g. SIM)
    target_cat: Tensor | None = None  # (B,) the target's category id

    def target(self) -> Tensor:
        """(B, Db): the target item as item ⊕ category ⊕ brand field embeddings."""
        return self.fields[:, list(self.target_index)].flatten(1)

    def with_fields(self, fields: Tensor) -> Embedded:
        return Embedded(fields, self.seq, self.seq_mask, self.target_index, self.seq_cat, self.target_cat)

    def repeat_interleave(self, fields: Tensor, k: int) -> Embedded:
        """k copies per sample, sample-major (row b·k + j is copy j of sample b), with new fields."""
        rep = lambda x: None if x is None else x.repeat_interleave(k, dim=0)  # noqa: E731
        return Embedded(fields, rep(self.seq), rep(self.seq_mask), self.target_index, rep(self.seq_cat),
                        rep(self.target_cat))


class FieldEmbedding(nn.Module):
    """Categorical fields → embedding rows; numeric fields → x'·w_f + b_f with
    x' = log1p(max(x, 0)) where the spec says so (counts), else x; behaviors share
    the target item's item/category/brand tables."""

    def __init__(self, spec: FeatureSpec, dim: int):
        super().__init__()
        self.spec, self.dim = spec, dim
        self.tables = nn.ModuleDict({n: nn.Embedding(v, dim, padding_idx=0) for n, v in spec.categorical.items()})
        n_num = len(spec.numeric)
        self.num_w = nn.Parameter(torch.randn(n_num, dim) * 0.1)
        self.num_b = nn.Parameter(torch.zeros(n_num, dim))
        self.register_buffer("log_mask", torch.tensor([t == "log1p" for t in spec.numeric.values()]), persistent=False)
        for t in self.tables.values():
            nn.init.normal_(t.weight, std=0.05)
            with torch.no_grad():
                t.weight[0].zero_()
        names = spec.fields
        self.target_index = tuple(names.index(f) for f in ITEM_FIELDS)

    def numeric(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, n_num) transformed numeric values."""
        x = torch.stack([batch[n].float() for n in self.spec.numeric], dim=1)
        return torch.where(self.log_mask, torch.log1p(x.clamp_min(0)), x)

    def forward(self, batch: dict[str, Tensor]) -> Embedded:
        cats = [self.tables[n](batch[n]) for n in self.spec.categorical]  # F_cat × (B, D)
        num = self.numeric(batch).unsqueeze(-1) * self.num_w + self.num_b  # (B, n_num, D)
        fields = torch.cat([torch.stack(cats, dim=1), num], dim=1)  # (B, F, D)
        seq = torch.cat([self.tables[f](batch[s]) for f, s in zip(ITEM_FIELDS, SEQ_FIELDS, strict=True)], -1)  # (B, L, Db)
        L = seq.shape[1]
        seq_mask = torch.arange(L, device=seq.device)[None, :] >= (L - batch["hist_len"].clamp(max=L))[:, None]
        return Embedded(fields, seq, seq_mask, self.target_index, batch["hist_cat_idx"], batch["cat_idx"])


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, E), (B, L) → (B, E); zero for rows with no valid position."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def short_view(emb: Embedded, short_len: int) -> tuple[Tensor, Tensor]:
    """The last `short_len` behaviors (left-padded layout: most recent last)."""
    return emb.seq[:, -short_len:], emb.seq_mask[:, -short_len:]


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: list[int], d_out: int | None = 1, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d_in, h), nn.ReLU(), nn.Dropout(dropout)]
            d_in = h
        if d_out is not None:
            layers.append(nn.Linear(d_in, d_out))
        self.net = nn.Sequential(*layers)
        self.d_out = d_out if d_out is not None else d_in

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TargetAttention(nn.Module):
    """DIN's local activation unit: a = MLP([q, k, q−k, q⊙k]) per behavior; softmax over
    valid positions (Zhou et al., 2018); pooled = Σ a_j k_j. Rows with no behavior pool to 0."""

    def __init__(self, d: int, hidden: list[int] | None = None):
        super().__init__()
        self.score = MLP(4 * d, hidden or [64, 32], 1)

    def forward(self, q: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """q (B, E), keys (B, L, E), mask (B, L) → (B, E)."""
        qq = q.unsqueeze(1).expand_as(keys)
        s = self.score(torch.cat([qq, keys, qq - keys, qq * keys], -1)).squeeze(-1)  # (B, L)
        s = s.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-padding rows → 0
        return torch.einsum("bl,ble->be", a, keys)


class CrossLayerV2(nn.Module):
    """DCNv2 (Wang et al., 2021) eq. 1: x_{l+1} = x_0 ⊙ (W x_l + b) + x_l, optionally low-rank W = U Vᵀ."""

    def __init__(self, d: int, rank: int | None = None):
        super().__init__()
        self.proj = nn.Linear(d, d) if rank is None else nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, d))

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.proj(x) + x


class TokenFFN(nn.Module):
    """Per-token-type feed-forward networks: token t uses the weights of type[t]
    (OneTrans's PFFN; CDNet eq. 6 shares one type among its core tokens)."""

    def __init__(self, d: int, hidden: int, n_types: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_types, d, hidden) * d**-0.5)
        self.b1 = nn.Parameter(torch.zeros(n_types, hidden))
        self.w2 = nn.Parameter(torch.randn(n_types, hidden, d) * hidden**-0.5)
        self.b2 = nn.Parameter(torch.zeros(n_types, d))

    def forward(self, x: Tensor, types: Tensor) -> Tensor:
        """x (B, T, D), types (T,) int64 → (B, T, D)."""
        h = torch.relu(torch.einsum("btd,tdh->bth", x, self.w1[types]) + self.b1[types])
        return torch.einsum("bth,thd->btd", h, self.w2[types]) + self.b2[types]


class TransformerBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)); x + FFN(LN(x)); the FFN is shared or per token type."""

    def __init__(self, d: int, heads: int, ffn_mult: int = 2, n_types: int = 0, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = TokenFFN(d, ffn_mult * d, n_types) if n_types else MLP(d, [ffn_mult * d], d)

    def forward(self, x: Tensor, pad: Tensor | None = None, types: Tensor | None = None) -> Tensor:
        """x (B, T, D); pad (B, T) True where a token is absent; types (T,) for per-type FFNs."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = self.ln2(x)
        return x + (self.ffn(h, types) if isinstance(self.ffn, TokenFFN) else self.ffn(h))
