"""DLF: Residual-Aware Low-Order Interaction + Network-Aware Attention Fusion (paper 001).

The paper's equations were lost in extraction; its public code (built on FuxiCTR)
uses Wukong-style blocks. We follow DESIGN.md's reconstruction. Notation: B batch,
n_l tokens at layer l (n_0 = F fields + 1 pooled-behavior token), D dim, r rank,
n_lo / n_hi / n_imp tokens produced by the three blocks, n_{l+1} = n_lo + n_hi + n_imp.

Per layer, with X_l (B, n_l, D) and X_0 the input embeddings:
- low-order block (RLI path 1, eq. 5), interacts with X_0:
    P = X_0 (X_lᵀ W_lo) ∈ (B, n_0, r) → LayerNorm → MLP → n_lo tokens
- high-order block (path 2, eq. 6), CrossNet-like, interacts with itself:
    P = X_l (X_lᵀ W_hi) ∈ (B, n_l, r) → LayerNorm → MLP → n_hi tokens
- implicit block (path 3, eq. 7): MLP(flatten X_l) → n_imp tokens
- NAF (eqs. 10–15): per block Q, K, V; each block's queries attend over the other
  two blocks (inter-block cross-attention, eq. 11–12) and over itself (intra-block
  self-attention, eq. 13); the two are concatenated and projected per block
  (eq. 14) and added to the block's own output, which "preserves the original
  block-specific outputs" (eq. 15) without doubling the token count. F_l = the
  fused blocks concatenated.
- gated residual (eq. 9): X_{l+1} = F_l + (σ(R(X_l) W_g) + ε) ⊙ R(X_l), R a learned
  token-count projection n_l → n_{l+1} (identity when equal). A LayerNorm after the sum is
  in neither eq. 9 nor DESIGN.md: `post_norm` (default off, the paper) adds it.
Head: flatten X_L → MLP → logit (`head="mlp"`), or eq. 16's "fully connected layer followed
by a sigmoid" (`head="linear"`: one FC layer).

Ablations: `use_gate=False` (plain residual), `use_rli=False` (the low-order block
interacts with X_l instead of X_0: no X_0 path), `use_naf=False` — the paper's ablation
(§4.4): "the model without the NAF block, where fusion is only performed in the final layer
as in traditional two-stream models": every layer but the last concatenates its blocks,
the last one fuses them with NAF.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import RankingModel
from models.configs import DLFConfig
from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput, masked_mean
from models.spec import FeatureSpec


def multihead(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """q (B, Tq, D), k/v (B, Tk, D) → (B, Tq, D) scaled dot-product attention over `heads` heads."""
    B, Tq, D = q.shape
    split = lambda x: x.view(B, x.shape[1], heads, D // heads).transpose(1, 2)  # noqa: E731  (B, H, T, D/H)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(B, Tq, D)


class InteractionBlock(nn.Module):
    """P = A (Bᵀ W) ∈ (B, n_a, r) → LayerNorm → MLP → n_out tokens (eqs. 5–6)."""

    def __init__(self, n_a: int, n_b: int, d: int, rank: int, n_out: int, hidden: list[int], dropout: float):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_b, rank) * n_b**-0.5)
        self.norm = nn.LayerNorm(rank)
        self.mlp = MLP(n_a * rank, hidden, n_out * d, dropout)
        self.n_out, self.d = n_out, d

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        proj = torch.einsum("bnd,nr->bdr", b, self.w)  # Bᵀ W: (B, D, r)
        p = self.norm(torch.einsum("bmd,bdr->bmr", a, proj))  # (B, n_a, r)
        return self.mlp(p.flatten(1)).view(-1, self.n_out, self.d)


class NAF(nn.Module):
    """Network-aware attention fusion over three blocks (eqs. 10–15)."""

    def __init__(self, d: int, heads: int, n_blocks: int = 3):
        super().__init__()
        self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(n_blocks)])
        self.out = nn.ModuleList([nn.Linear(2 * d, d) for _ in range(n_blocks)])
        self.heads = heads

    def forward(self, blocks: list[Tensor]) -> Tensor:
        qkv = [lin(b).chunk(3, dim=-1) for lin, b in zip(self.qkv, blocks, strict=True)]
        fused = []
        for i, blk in enumerate(blocks):
            q, k, v = qkv[i]
            ko = torch.cat([qkv[j][1] for j in range(len(blocks)) if j != i], 1)
            vo = torch.cat([qkv[j][2] for j in range(len(blocks)) if j != i], 1)
            cross = multihead(q, ko, vo, self.heads)  # eq. 11–12: inter-block
            self_att = multihead(q, k, v, self.heads)  # eq. 13: intra-block
            fused.append(self.out[i](torch.cat([cross, self_att], -1)) + blk)  # eq. 14–15
        return torch.cat(fused, 1)


class DLFLayer(nn.Module):
    def __init__(self, n_in: int, n0: int, cfg: DLFConfig, fuse: bool):
        super().__init__()
        d = cfg.embed_dim
        self.cfg = cfg
        n_a_low = n0 if cfg.use_rli else n_in
        self.low = InteractionBlock(n_a_low, n_in, d, cfg.rank, cfg.n_low, cfg.block_hidden, cfg.dropout)
        self.high = InteractionBlock(n_in, n_in, d, cfg.rank, cfg.n_high, cfg.block_hidden, cfg.dropout)
        self.implicit = MLP(n_in * d, cfg.block_hidden, cfg.n_implicit * d, cfg.dropout)
        self.naf = NAF(d, cfg.heads) if fuse else None
        self.n_out = cfg.n_low + cfg.n_high + cfg.n_implicit
        self.resize = nn.Linear(n_in, self.n_out, bias=False) if n_in != self.n_out else None
        self.gate = nn.Linear(d, d) if cfg.use_gate else None
        self.norm = nn.LayerNorm(d) if cfg.post_norm else None

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        """x (B, n_in, D), x0 (B, n_0, D) → (B, n_out, D)."""
        d = self.cfg.embed_dim
        blocks = [
            self.low(x0 if self.cfg.use_rli else x, x),
            self.high(x, x),
            self.implicit(x.flatten(1)).view(-1, self.cfg.n_implicit, d),
        ]
        f = self.naf(blocks) if self.naf is not None else torch.cat(blocks, 1)  # (B, n_out, D)
        r = self.resize(x.transpose(1, 2)).transpose(1, 2) if self.resize is not None else x  # R(X_l)
        if self.gate is not None:
            r = (torch.sigmoid(self.gate(r)) + self.cfg.gate_eps) * r  # eq. 9
        out = f + r
        return self.norm(out) if self.norm is not None else out


class DLF(RankingModel):
    Config = DLFConfig

    def __init__(self, spec: FeatureSpec, cfg: DLFConfig):
        super().__init__()
        if cfg.embed_dim % cfg.heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} must be divisible by heads {cfg.heads}")
        self.spec, self.cfg = spec, cfg
        d = cfg.embed_dim
        self.embedding = FieldEmbedding(spec, d, cfg.id_dropout)
        self.seq_token = nn.Linear(3 * d, d)
        n0 = spec.num_fields + 1
        layers, n = [], n0
        for i in range(cfg.layers):
            layers.append(DLFLayer(n, n0, cfg, fuse=cfg.use_naf or i == cfg.layers - 1))
            n = layers[-1].n_out
        self.layers = nn.ModuleList(layers)
        self.head = MLP(n * d, cfg.hidden if cfg.head == "mlp" else [], 1, cfg.dropout)

    def interact(self, emb: Embedded) -> ModelOutput:
        """fields (B, F, D), behaviors (B, L, Db) → logits (B,); X_0 = fields ⊕ pooled behaviors (B, F + 1, D)."""
        seq = self.seq_token(masked_mean(emb.seq, emb.seq_mask)).unsqueeze(1)  # (B, 1, D)
        x0 = torch.cat([emb.fields, seq], 1)  # (B, n_0, D)
        x = x0
        for layer in self.layers:
            x = layer(x, x0)
        return ModelOutput(self.head(x.flatten(1)).squeeze(-1))
