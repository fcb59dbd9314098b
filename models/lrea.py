"""LREA: Low-Rank Efficient Attention over long behavior sequences (paper 003).

Notation: B batch, L sequence length, Db behavior dim (item ⊕ category ⊕ brand),
r rank, h attention hidden size, N candidates of one user at serving time.
E_s (L × Db) the behaviors (zero at padding), E_t (Db) the target.

- Compression (eq. 4): W_comp ∈ R^{L×r}, W_decomp ∈ R^{r×L};
  E_comp = E_sᵀ W_comp (Db × r); the decompressed sequence Ẽ = (E_comp W_decomp)ᵀ (L × Db).
- Training path (eq. 5, second line — φ applied to each part of W_in = [W_1; W_2; W_3]):
    a_j = [φ(E_t W_1) + φ(ẽ_j W_2) + φ((E_t ⊙ ẽ_j) W_3)] W_o,   φ = LeakyReLU
    interest = Σ_j a_j e_j = E_sᵀ a.
- Non-negativity (eq. 10): L_non-neg = ‖max(0, −W_decomp)‖² + ‖max(0, −E_comp)‖², returned
  as the aux term "non_neg" and weighted by λ in the training step (eq. 11).
- Serving path (eqs. 6, 8, 9): when φ(AB) = Aφ(B) holds (W_decomp ≥ 0 and the parts inside
  φ sign-consistent — what L_non-neg pushes towards), the sum over L factors through r:
    a = φ(E_t W_1) W_o · 1 + W_decompᵀ s,   s = [φ(E_compᵀ W_2) + φ((E_t ⊙ E_compᵀ) W_3)] W_o (r)
    interest = φ(E_t W_1) W_o · Σ_j e_j + E_auxabsorb s,   E_auxabsorb = E_sᵀ W_decompᵀ (Db × r).
  `absorb` caches (E_comp, E_auxabsorb, Σ_j e_j, φ(E_compᵀ W_2) W_o) per user; `score` costs
  O(r·Db·h) per candidate, independent of L. The first term (the target alone) needs Σ_j e_j,
  which eq. 9 leaves implicit; caching it keeps the two paths equal. A user with fewer behaviors
  than r is served by eq. 5 itself over them, in the same cache layout: exact, and
  O(L_u·Db·h) < O(r·Db·h).
The interest joins the other field embeddings in an MLP (§3.1, last sentence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import RankingModel
from models.configs import LREAConfig
from models.layers import MLP, Embedded, FieldEmbedding, ModelOutput
from models.spec import FeatureSpec


def recency_buckets(L: int, r: int) -> tuple[Tensor, Tensor]:
    """The initial (W_comp (L, r), W_decomp (r, L)): r contiguous recency buckets of the L positions,
    W_comp[j, b] = 1/|b| for j in bucket b (E_comp's column b = the mean of bucket b's behaviors),
    W_decomp[b, j] = 1 (each position reads its bucket's mean back). Non-negative, so training starts
    where the absorbed path (eq. 9) is exact, and W_comp W_decomp is block-diagonal of rank min(r, L):
    attention can tell behaviors of different buckets apart from step 0. (A uniform positive
    init makes W_comp W_decomp a rank-1 average: every ẽ_j equal, so LREA starts — and stays —
    a sum-pool.) With r > L the extra buckets are empty (zero columns and rows)."""
    w_comp, w_decomp = torch.zeros(L, r), torch.zeros(r, L)
    for b, pos in enumerate(torch.arange(L).tensor_split(min(r, L))):
        w_comp[pos, b] = 1.0 / len(pos)
        w_decomp[b, pos] = 1.0
    return w_comp, w_decomp


@dataclass
class LREACache:
    """Per-user serving state (U users): everything `score` needs, nothing of size L.

    Its c columns are either E_comp's r' live columns (eq. 9), or — when the users' histories hold
    fewer behaviors than that — the held behaviors themselves: e_comp the decompressed ẽ_j, e_aux
    the e_j, c2 φ(ẽ_j W_2) W_o. `score` reads both the same way, because eq. 5 regrouped is
    interest = φ(E_t W_1) W_o · Σ_j e_j + Σ_j [φ(ẽ_j W_2) + φ((E_t ⊙ ẽ_j) W_3)] W_o · e_j, the
    shape of eq. 9 with the positions for columns (see `LREA.absorb`)."""

    e_comp: Tensor  # (U, Db, c)  E_comp's live columns, or ẽ_j of the held positions
    e_aux: Tensor  # (U, Db, c)   E_auxabsorb, or e_j of the held positions
    e_sum: Tensor  # (U, Db)
    c2: Tensor  # (U, c)          φ(column W_2) W_o


class LREA(RankingModel):
    Config = LREAConfig

    def __init__(self, spec: FeatureSpec, cfg: LREAConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        L, r, h, db = spec.seq_len, cfg.rank, cfg.attention_hidden, 3 * cfg.embed_dim
        self.embedding = FieldEmbedding(spec, cfg.embed_dim, cfg.id_dropout)
        w_comp, w_decomp = recency_buckets(L, r)
        self.w_comp, self.w_decomp = nn.Parameter(w_comp), nn.Parameter(w_decomp)
        self.w1, self.w2, self.w3 = (nn.Linear(db, h, bias=False) for _ in range(3))
        self.w_o = nn.Linear(h, 1, bias=False)
        self.mlp = MLP(spec.num_fields * cfg.embed_dim + db, cfg.hidden, 1, cfg.dropout)

    def loss_weights(self) -> dict[str, float]:
        return {"non_neg": self.cfg.lam}

    def phi(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.cfg.negative_slope)

    # ------------------------------------------------------------------ training path (eq. 5)

    def compress(self, seq: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """E_s (B, L, Db) zeroed at padding, and E_comp = E_sᵀ W_comp (B, Db, r)."""
        e_s = seq * mask.unsqueeze(-1)
        return e_s, torch.einsum("bld,lr->bdr", e_s, self.w_comp)

    def interest_train(self, e_t: Tensor, e_s: Tensor, e_comp: Tensor) -> Tensor:
        """(B, Db): Σ_j a_j e_j with a_j from the decompressed behaviors (eq. 5)."""
        e_dec = torch.einsum("bdr,rl->bld", e_comp, self.w_decomp)  # Ẽ (B, L, Db)
        t = e_t.unsqueeze(1)
        a = (self.phi(self.w1(t)) + self.phi(self.w2(e_dec)) + self.phi(self.w3(t * e_dec)))  # (B, L, h)
        a = self.w_o(a).squeeze(-1)  # (B, L)
        return torch.einsum("bl,bld->bd", a, e_s)

    def non_negativity(self, e_comp: Tensor) -> Tensor:
        """eq. 10, E_comp's term averaged over the batch."""
        return F.relu(-self.w_decomp).pow(2).sum() + F.relu(-e_comp).pow(2).sum((1, 2)).mean()

    def interact(self, emb: Embedded) -> ModelOutput:
        """fields (B, F, D), behaviors (B, L, Db) → logits (B,) and the aux term "non_neg" (eq. 10)."""
        e_s, e_comp = self.compress(emb.seq, emb.seq_mask)
        interest = self.interest_train(emb.target(), e_s, e_comp)
        logits = self.mlp(torch.cat([emb.fields.flatten(1), interest], -1)).squeeze(-1)
        return ModelOutput(logits, aux={"non_neg": self.non_negativity(e_comp)})

    # ------------------------------------------------------------------ serving path (eq. 9)

    def absorb(self, seq: Tensor, mask: Tensor, short_exact: bool = True) -> LREACache:
        """Per-user cache from behaviors (U, L, Db) and their mask (U, L): O(L·Db·r) once per user.
        A rank column of E_comp that is zero for every user here is dropped (r' ≤ r columns kept):
        it adds exactly zero to eq. 9 (its s_b is w_o·φ(0) = 0), and with r > L the recency-bucket
        init leaves r − L of them zero for good (an empty bucket and its W_decomp row get no gradient).

        `short_exact`: when the users' histories fill fewer positions than r', the cache holds those
        positions instead (ẽ_j, e_j): eq. 5 itself, exact whatever the signs, at O(L_u·Db·h) per
        candidate instead of O(r'·Db·h). The paper's saving rests on "rank r ≪ L, reducing attention
        complexity from O(L) to O(r)" (§Abstract); a user with L_u < r behaviors is the case where
        the premise fails, and a served world's median user is one (12 clicks against r' = 50 on the
        small world). False: eq. 9 always (what `serving_gap` measures)."""
        e_s, e_comp = self.compress(seq, mask)
        live = e_comp.abs().amax((0, 1)) > 0  # (r,)
        held = mask.any(0)  # (L,) the positions some user's history fills
        if short_exact and int(held.sum()) < int(live.sum()):
            cols = torch.einsum("bdr,rl->bdl", e_comp, self.w_decomp[:, held])  # ẽ_j (U, Db, L_u)
            aux = e_s[:, held].transpose(1, 2)  # e_j (U, Db, L_u)
        else:
            cols = e_comp[..., live]
            aux = torch.einsum("uld,rl->udr", e_s, self.w_decomp[live])  # E_sᵀ W_decompᵀ
        c2 = self.w_o(self.phi(self.w2(cols.transpose(1, 2)))).squeeze(-1)  # (U, c)
        return LREACache(cols, aux, e_s.sum(1), c2)

    def absorb_batch(self, batch: dict[str, Tensor], short_exact: bool = True) -> LREACache:
        emb = self.embed(batch)
        return self.absorb(emb.seq, emb.seq_mask, short_exact)

    def interest_serve(self, cache: LREACache, e_t: Tensor, user: Tensor | None = None) -> Tensor:
        """(N, Db) interest of N candidates; `user` (N,) indexes the cache row of each
        candidate (None: all of cache row 0, one user — the server's case). O(r·Db·h) per candidate."""
        t0 = self.w_o(self.phi(self.w1(e_t)))  # (N, 1)
        if user is None:  # one user: E_comp folded into W_3 once, then one (N, Db) × (Db, r·h) product
            n, r, h = e_t.shape[0], cache.c2.shape[1], self.w3.weight.shape[0]
            w3u = (cache.e_comp[0].unsqueeze(-1) * self.w3.weight.t().unsqueeze(1)).flatten(1)  # (Db, r·h)
            s = cache.c2[0] + self.phi(e_t @ w3u).view(n, r, h) @ self.w_o.weight[0]  # (N, r)
            return t0 * cache.e_sum[0] + s @ cache.e_aux[0].t()
        e_comp_t = cache.e_comp[user].transpose(1, 2)  # (N, r, Db)
        s = cache.c2[user] + self.w_o(self.phi(self.w3(e_t.unsqueeze(1) * e_comp_t))).squeeze(-1)  # (N, r)
        return t0 * cache.e_sum[user] + torch.einsum("ndr,nr->nd", cache.e_aux[user], s)

    def score(self, cache: LREACache, candidates: dict[str, Tensor], user: Tensor | None = None) -> Tensor:
        """Logits (N,) of candidate rows (their non-sequence fields) with the absorbed interest."""
        emb = self.embedding(candidates | _empty_history(candidates, self.spec.seq_len))
        interest = self.interest_serve(cache, emb.target(), user)
        return self.mlp(torch.cat([emb.fields.flatten(1), interest], -1)).squeeze(-1)


def _empty_history(batch: dict[str, Tensor], L: int) -> dict[str, Tensor]:
    """Candidate rows carry no history at serving time (it lives in the cache)."""
    if "hist_len" in batch:
        return {}
    n = next(iter(batch.values())).shape[0]
    dev = next(iter(batch.values())).device
    z = torch.zeros(n, 1, dtype=torch.long, device=dev)
    return {"hist_item_idx": z, "hist_cat_idx": z, "hist_brand_idx": z, "hist_len": torch.zeros(n, dtype=torch.long, device=dev)}


@torch.no_grad()
def serving_gap(model: LREA, batch: dict[str, Tensor]) -> dict[str, float]:
    """How far the absorbed serving path (eq. 9, for every history length) is from the training path on real rows:
    relative L2 gap of the interest vectors and mean |Δ logit|."""
    was = model.training
    model.eval()
    emb = model.embed(batch)
    e_s, e_comp = model.compress(emb.seq, emb.seq_mask)
    train_i = model.interest_train(emb.target(), e_s, e_comp)
    cache = model.absorb(emb.seq, emb.seq_mask, short_exact=False)  # eq. 9 itself
    B = emb.seq.shape[0]
    serve_i = model.interest_serve(cache, emb.target(), torch.arange(B, device=emb.seq.device))
    head = lambda i: model.mlp(torch.cat([emb.fields.flatten(1), i], -1)).squeeze(-1)  # noqa: E731
    model.train(was)
    return {
        "interest_rel_gap": float((train_i - serve_i).norm() / train_i.norm().clamp_min(1e-12)),
        "logit_abs_gap": float((head(train_i) - head(serve_i)).abs().mean()),
    }
