"""Shared blocks: field embeddings, MLP, DIN target attention, DCNv2 cross layer, Transformer block.

Notation used across models/: B batch, L behavior-sequence length, F fields,
D embedding dim, Db = 3·D a behavior (item ⊕ category ⊕ brand), k core behaviors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.spec import AGE_BUCKETS, ITEM_FIELDS, RATE_EPS, SEQ_FIELDS, FeatureSpec


@dataclass
class ModelOutput:
    """What every model returns.

    logits:      (B,) click logits of the serving path.
    aux:         named scalar loss terms that need no labels (e.g. LREA's non-negativity).
    aux_logits:  named (B, k) logits of auxiliary predictions on augmented copies of each
                 sample, sample-major: column j of row b belongs to sample b, so its label
                 is labels[b] (AdaF2M2's masked forwards); the loss sums over the k copies.
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
    group:  None, or (B,) int64 when rows share histories (`FieldEmbedding(shared_history=True)` on a
            batch with `hist_group`: a served request's candidates): row b's behaviors are then
            seq[group[b]], and `seq` / `seq_age` hold U distinct histories (U, L, Db). Every other
            field stays per row, seq_mask, seq_cat and seq_age_idx included.
    """

    fields: Tensor
    seq: Tensor | None  # None when pooled at lookup (see `pooled`)
    seq_mask: Tensor | None
    target_index: tuple[int, ...]  # positions of item_idx, cat_idx, brand_idx in `fields`
    seq_cat: Tensor | None = None  # (B, L) the behaviors' category ids (search keys, e.g. SIM)
    target_cat: Tensor | None = None  # (B,) the target's category id
    seq_age: Tensor | None = None  # (B, L, Db) the behaviors' age embeddings (FieldEmbedding behavior_age)
    seq_age_idx: Tensor | None = None  # (B, L) the behaviors' age buckets, as the batch has them (hist_age_idx)
    # (B, Db) the behaviors' masked mean, when it was pooled at lookup (`FieldEmbedding(pooled_only=True)`,
    # then `seq` is None): what a model that only reads the mean needs, without the (B, L, Db) tensor
    pooled: Tensor | None = None
    group: Tensor | None = None

    def row_seq(self, x: Tensor) -> Tensor:
        """(B, ...) the per-row view of a tensor over `seq`'s rows (itself when rows own their histories)."""
        if self.group is None:
            return x
        return x.expand(len(self.group), *x.shape[1:]) if x.shape[0] == 1 else x[self.group]

    def target(self) -> Tensor:
        """(B, Db): the target item as item ⊕ category ⊕ brand field embeddings."""
        return self.fields[:, list(self.target_index)].flatten(1)

    def with_fields(self, fields: Tensor, seq: Tensor | None = None) -> Embedded:
        """The same batch with new field tokens (and, if given, new behavior embeddings)."""
        return Embedded(fields, self.seq if seq is None else seq, self.seq_mask, self.target_index, self.seq_cat,
                        self.target_cat, self.seq_age, self.seq_age_idx, group=self.group)

    def repeat_interleave(self, fields: Tensor, k: int, seq: Tensor | None = None) -> Embedded:
        """k copies per sample, sample-major (row b·k + j is copy j of sample b), with new fields
        (B·k, F, D) and, if given, new behaviors (B·k, L, Db)."""
        if self.group is not None:
            raise ValueError("repeat_interleave on rows that share histories (Embedded.group): embed without it")
        rep = lambda x: None if x is None else x.repeat_interleave(k, dim=0)  # noqa: E731
        return Embedded(fields, rep(self.seq) if seq is None else seq, rep(self.seq_mask), self.target_index,
                        rep(self.seq_cat), rep(self.target_cat), rep(self.seq_age), rep(self.seq_age_idx))


class FieldEmbedding(nn.Module):
    """Categorical fields → embedding rows; numeric fields → z·w_f + b_f with
    z = (t_f(x) − mean_f) / std_f, t_f = log1p(max(x, 0)) for counts, logit(clip(x)) for rates
    (`models.spec.numeric_transform`), mean/std of t_f(x) over the train split (the spec's
    `numeric_stats`, from feature_spec.json): every numeric input arrives at unit scale, in
    training and in serving alike. Behaviors share the target item's item/category/brand tables.

    Fields in `spec.unpadded` (hour, day of week) have no padding row: their 0 is a value.
    `id_dropout`: in training, each id of `spec.id_fields` (user, item) is replaced by the OOV
    id 1 with this probability, so the OOV row — what every user or item unseen in train maps
    to at test and serving time — is trained rather than left at its random init.

    `behavior_age`: also embed each behavior's age at the request time (`hist_age_idx`, log2-hour
    buckets; `models.spec.behavior_age_bucket`) into `Embedded.seq_age` (B, L, Db), kept apart
    from `seq` so that a model decides where recency enters (CDNet: its behavior tokens, not its
    target-behavior similarity)."""

    def __init__(self, spec: FeatureSpec, dim: int, id_dropout: float = 0.0, behavior_age: bool = False):
        super().__init__()
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {id_dropout}")
        self.spec, self.dim, self.id_dropout = spec, dim, id_dropout
        self.tables = nn.ModuleDict({n: nn.Embedding(v, dim, padding_idx=None if n in spec.unpadded else 0)
                                     for n, v in spec.categorical.items()})
        n_num = len(spec.numeric)
        self.num_w = nn.Parameter(torch.randn(n_num, dim) * 0.1)
        self.num_b = nn.Parameter(torch.zeros(n_num, dim))
        kinds = list(spec.numeric.values())
        mean, std = spec.standardiser()
        self.register_buffer("log_mask", torch.tensor([t == "log1p" for t in kinds], dtype=torch.bool), persistent=False)
        self.register_buffer("logit_mask", torch.tensor([t == "logit" for t in kinds], dtype=torch.bool), persistent=False)
        self.register_buffer("num_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("num_std", torch.tensor(std, dtype=torch.float32), persistent=False)
        for n, t in self.tables.items():
            nn.init.normal_(t.weight, std=0.05)
            if n not in spec.unpadded:
                with torch.no_grad():
                    t.weight[0].zero_()
        self.age = None
        if behavior_age:
            self.age = nn.Embedding(AGE_BUCKETS, len(ITEM_FIELDS) * dim, padding_idx=0)
            nn.init.normal_(self.age.weight, std=0.05)
            with torch.no_grad():
                self.age.weight[0].zero_()
        names = spec.fields
        self.target_index = tuple(names.index(f) for f in ITEM_FIELDS)

    def numeric(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, n_num) transformed and standardised numeric values."""
        x = torch.stack([batch[n].float() for n in self.spec.numeric], dim=1)
        p = x.clamp(RATE_EPS, 1.0 - RATE_EPS)
        x = torch.where(self.log_mask, torch.log1p(x.clamp_min(0)), torch.where(self.logit_mask, torch.logit(p), x))
        return (x - self.num_mean) / self.num_std

    def ids(self, name: str, batch: dict[str, Tensor]) -> Tensor:
        """The id column, with id-to-OOV dropout in training for the spec's id fields (not padding)."""
        x = batch[name]
        if self.training and self.id_dropout > 0 and name in self.spec.id_fields:
            drop = (torch.rand(x.shape, device=x.device) < self.id_dropout) & (x > 0)
            x = torch.where(drop, torch.ones_like(x), x)
        return x

    def forward(self, batch: dict[str, Tensor], pooled_only: bool = False, shared_history: bool = False) -> Embedded:
        """`pooled_only`: the behaviors come back as their masked mean only (`Embedded.pooled`,
        `seq` None), summed inside one `embedding_bag` per field with the positions' validity as
        per-sample weights: no (B, L, Db) lookup, concat or product, forward or backward, and
        equal to `masked_mean(seq, seq_mask)` (padding is masked by position, whatever it holds).

        `shared_history`: when the batch has `hist_group` ((B,) int64, equal for rows that hold the
        same history: serving.funnel.Ranker's one per request) and no gradient is recorded, the
        behaviors are looked up once per distinct history (`Embedded.group`). With a backward pass the
        key is ignored: every row gets its own behaviors (their gradients are per row)."""
        cats = [self.tables[n](self.ids(n, batch)) for n in self.spec.categorical]  # F_cat × (B, D)
        num = self.numeric(batch).unsqueeze(-1) * self.num_w + self.num_b  # (B, n_num, D)
        fields = torch.cat([torch.stack(cats, dim=1), num], dim=1)  # (B, F, D)
        if pooled_only and self.age is None:
            L = batch[SEQ_FIELDS[0]].shape[1]
            valid = history_mask(batch["hist_len"], L).to(fields.dtype)  # (B, L)
            n = valid.sum(-1, keepdim=True).clamp_min(1.0)  # (B, 1)
            pooled = torch.cat([F.embedding_bag(batch[s], self.tables[f].weight, mode="sum", per_sample_weights=valid)
                                for f, s in zip(ITEM_FIELDS, SEQ_FIELDS, strict=True)], -1) / n  # (B, Db)
            return Embedded(fields, None, None, self.target_index, batch["hist_cat_idx"], batch["cat_idx"],
                            pooled=pooled)
        group, first = None, None
        if shared_history and "hist_group" in batch and not torch.is_grad_enabled():
            group, first = distinct_rows(batch["hist_group"])
        pick = (lambda x: x) if first is None else (lambda x: x.index_select(0, first))
        seq = torch.cat([self.tables[f](pick(batch[s])) for f, s in zip(ITEM_FIELDS, SEQ_FIELDS, strict=True)], -1)  # (B|U, L, Db)
        L = seq.shape[1]
        seq_mask = history_mask(batch["hist_len"], L)
        age = None
        if self.age is not None:
            if "hist_age_idx" not in batch:
                raise missing_age("this model (behavior_age=True)")
            age = self.age(pick(batch["hist_age_idx"]))
        return Embedded(fields, seq, seq_mask, self.target_index, batch["hist_cat_idx"], batch["cat_idx"], age,
                        batch.get("hist_age_idx"), group=group)


def distinct_rows(hist_group: Tensor) -> tuple[Tensor, Tensor]:
    """`hist_group` (B,) → (group (B,) in 0..U-1, first (U,) one row holding each distinct history)."""
    ids, group = torch.unique(hist_group, return_inverse=True)
    first = torch.full((len(ids),), len(hist_group), dtype=torch.long, device=hist_group.device)
    first = first.scatter_reduce(0, group, torch.arange(len(hist_group), device=hist_group.device), "amin")
    return group, first


def history_mask(hist_len: Tensor, L: int) -> Tensor:
    """(B,) lengths → (B, L) True at the valid positions of a left-padded history (most recent last)."""
    return torch.arange(L, device=hist_len.device)[None, :] >= (L - hist_len.clamp(max=L))[:, None]


def trim_history(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch with its (B, L) history columns (`hist_*` but hist_len) cut to their last
    max(hist_len) positions: histories are left-padded, so the leading positions that are padding in
    every row go, and every valid position stays where it was relative to the most recent one. A
    served request pads each candidate row to the model's L (200 on the small world) whatever the
    user's clicks; a model whose cost grows with L and whose output only reads valid positions
    (CDNet) computes on what the batch holds. One host sync (the max) per batch."""
    L = batch[SEQ_FIELDS[0]].shape[1]
    n = max(1, min(L, int(batch["hist_len"].max()))) if batch["hist_len"].numel() else L
    if n == L:
        return batch
    return {k: v[:, L - n:] if k.startswith("hist_") and k != "hist_len" and v.dim() == 2 else v
            for k, v in batch.items()}


def missing_age(who: str) -> KeyError:
    """The one error of a model that reads the behaviors' age from a batch without it."""
    return KeyError(f"{who} reads the behaviors' age but the batch has no hist_age_idx: build it with "
                    "training.batches.RankingBatcher on rows with ts")


def category_recency(seq_cat: Tensor, target_cat: Tensor, seq_age_idx: Tensor, mask: Tensor) -> Tensor:
    """(B,) int64: the age bucket (models.spec.behavior_age_bucket) of the user's most recent behavior
    in the target's category — 1 ("unknown") when the history holds none. Histories are left-padded,
    most recent last, so that behavior is the last match."""
    match = (seq_cat == target_cat[:, None]) & mask  # (B, L)
    L = match.shape[1]
    last = torch.where(match, torch.arange(L, device=match.device)[None, :], -1).max(1).values  # (B,)
    age = seq_age_idx.gather(1, last.clamp_min(0)[:, None])[:, 0]
    return torch.where(last >= 0, age, torch.ones_like(age))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, E), (B, L) → (B, E); zero for rows with no valid position."""
    m = mask.to(x.dtype).unsqueeze(1)  # (B, 1, L)
    # a batched mat-vec, not (x * m).sum(1): no (B, L, E) temporary forward or backward
    # (benchmarks/peer_fuxictr.py: the product was 13% of a DCNv2 step at L = 200)
    return torch.bmm(m, x).squeeze(1) / m.sum(-1).clamp_min(1.0)


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
    """DIN's local activation unit: a = MLP([q, k, q−k, q⊙k]) per behavior; pooled = Σ a_j k_j.
    `normalize="softmax"`: a softmax over the valid positions; `"none"`: the raw weights, as in
    the DIN paper (Zhou et al., 2018, §4.3: "normalization with softmax on the output of a(·)
    is abandoned ... to reserve the intensity of user interests"). Rows with no behavior pool to 0."""

    def __init__(self, d: int, hidden: list[int] | None = None, normalize: str = "softmax"):
        super().__init__()
        if normalize not in ("softmax", "none"):
            raise ValueError(f"attention normalize must be 'softmax' or 'none', got {normalize!r}")
        self.score = MLP(4 * d, hidden or [64, 32], 1)
        self.normalize = normalize

    def first_layer(self, q: Tensor, keys: Tensor) -> Tensor:
        """The score MLP's first layer W·[q, k, q−k, q⊙k] + b, (B, E), (B, L, E) → (B, L, H), without
        the (B, L, 4E) input: with W = [W_q W_k W_d W_p] it is (W_q + W_d) q + b, once per sample, plus
        k·M_b per behavior, M_b = (W_k − W_d)ᵀ + diag(q_b) W_pᵀ (E, H) — one batched product over the
        behaviors at E·H per behavior instead of 4E·H, and the same weights (checkpoints unchanged).
        About 5x faster forward + backward at B 4,096, L 200, E 192, H 64 (benchmarks/RESULTS.md)."""
        lin = self.score.net[0]
        w_q, w_k, w_d, w_p = lin.weight.split(q.shape[-1], dim=1)  # (H, E) each
        per_sample = F.linear(q, w_q + w_d, lin.bias)  # (B, H)
        m = (w_k - w_d).t().unsqueeze(0) + q.unsqueeze(-1) * w_p.t().unsqueeze(0)  # (B, E, H)
        return torch.baddbmm(per_sample.unsqueeze(1), keys, m)

    def forward(self, q: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """q (B, E), keys (B, L, E), mask (B, L) → (B, E)."""
        s = self.score.net[1:](self.first_layer(q, keys)).squeeze(-1)  # (B, L)
        if self.normalize == "none":
            a = s * mask.to(s.dtype)
        else:
            a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)  # all-padding rows → 0
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
        x = x + self.attend(h, pad)
        h = self.ln2(x)
        return x + (self.ffn(h, types) if isinstance(self.ffn, TokenFFN) else self.ffn(h))

    def attend(self, h: Tensor, pad: Tensor | None = None) -> Tensor:
        """Self-attention (B, T, D) with `self.attn`'s weights (nn.MultiheadAttention: its parameters
        and checkpoints), written out: softmax(q kᵀ / √d_h + mask) v on (B, heads, T, d_h). The same
        numbers as the module; at CDNet's sizes (T ≈ 27 tokens, d_h = 8) about 2x faster than
        scaled_dot_product_attention and more than the module's fast path, whose masked softmax
        dominated the serving forward (benchmarks/RESULTS.md, "Serving load"). Contiguous heads (one copy
        before the matmuls) were 10% faster alone on one shape and 9–14% slower in the served forward
        (session 11): the heads stay strided."""
        a, (B, T, d) = self.attn, h.shape
        qkv = F.linear(h, a.in_proj_weight, a.in_proj_bias).view(B, T, 3, a.num_heads, d // a.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, T, d_h) each
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, heads, T, T)
        if pad is not None:
            s = s.masked_fill_(pad[:, None, None, :], float("-inf"))
        w = s.softmax(-1)
        if self.training and a.dropout > 0:
            w = F.dropout(w, a.dropout)
        o = torch.matmul(w, v)  # (B, heads, T, d_h)
        return a.out_proj(o.transpose(1, 2).reshape(B, T, d))
