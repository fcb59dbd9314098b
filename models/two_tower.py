"""Two-tower retrieval (YouTube-DNN style) and its AdaF2M2 towers.

Notation: B batch, D field dim, d tower output dim, F_u / F_i user / item fields.

- Only user-side fields (user_idx, u_*, user_*) and item-side fields (item_idx, cat_idx,
  brand_idx, item_*) are embedded; context fields belong to neither tower.
- User tower: MLP over the user's fields (user id, profile, user-side counters and
  state) ⊕ the masked mean of the history's behaviors; item tower: MLP over the item's
  fields (item id, category, brand, item-side counters; `item_counters: false` leaves the
  counters out, so the item tower cannot read popularity off them). Outputs L2-normalised.
- Loss: in-batch sampled softmax with the log-q correction (Yi et al., 2019):
  s_ij = ⟨u_i, v_j⟩ / τ − log q_j, cross-entropy with the diagonal as the positive;
  q_j = the probability that item j is sampled as an in-batch negative (its share of
  training clicks), given per row as `item_logq`. Duplicates of the positive item
  elsewhere in the batch are not negatives.
- AdaF2M2 towers (paper 002, §3.3 for two towers): a user adapter fed only user states
  (active days, user ID embedding and its norms, user interaction count) weights the user
  fields; an item adapter fed only item states (item ID embedding and norms, item count)
  weights the item fields. The feature mask masks each tower's fields with their own
  [MASK] embeddings in k copies; L_aux is the same sampled softmax on the copies, without
  the adapters. In eval mode only the adapted main path runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.configs import TwoTowerConfig
from models.layers import MLP, FieldEmbedding, ModelOutput, masked_mean
from models.spec import SEQ_FIELDS, FeatureSpec

ITEM_SIDE = ("item_idx", "cat_idx", "brand_idx")


def sampled_softmax_loss(u: Tensor, v: Tensor, item_keys: Tensor, logq: Tensor | None, temperature: float) -> Tensor:
    """In-batch sampled softmax with log-q correction. u, v (B, d); item_keys (B,); logq (B,)."""
    s = u @ v.T / temperature  # (B, B)
    if logq is not None:
        s = s - logq[None, :]
    dup = (item_keys[:, None] == item_keys[None, :]) & ~torch.eye(len(item_keys), dtype=torch.bool, device=u.device)
    s = s.masked_fill(dup, float("-inf"))
    return F.cross_entropy(s, torch.arange(len(u), device=u.device))


def is_item_side(name: str) -> bool:
    return name in ITEM_SIDE or name.startswith("item_")


def is_user_side(name: str) -> bool:
    return name == "user_idx" or name.startswith(("u_", "user_"))


def split_fields(spec: FeatureSpec) -> tuple[list[int], list[int]]:
    """Indices of user-side and item-side fields in `spec.fields`."""
    names = spec.fields
    return [i for i, n in enumerate(names) if is_user_side(n)], [i for i, n in enumerate(names) if is_item_side(n)]


class TowerAdapter(nn.Module):
    """σ(h(state)) over one tower's fields; state = [signals, ID embedding, log/sqrt/square norm]."""

    def __init__(self, n_signals: int, d: int, n_fields: int, hidden: list[int]):
        super().__init__()
        self.h = MLP(n_signals + d + 3, hidden, n_fields)

    def forward(self, signals: Tensor, id_emb: Tensor) -> Tensor:
        e = id_emb.detach()
        n = e.norm(dim=-1, keepdim=True)
        return torch.sigmoid(self.h(torch.cat([signals, e, torch.log(n + 1e-6), n.sqrt(), n**2], -1)))


class TwoTower(nn.Module):
    Config = TwoTowerConfig

    def __init__(self, spec: FeatureSpec, cfg: TwoTowerConfig):
        super().__init__()
        # Context fields (position, hour, ...) belong to neither tower: they are not embedded.
        spec = spec.subset(lambda n: is_user_side(n) or (is_item_side(n) and (cfg.item_counters or n in ITEM_SIDE)))
        self.spec, self.cfg = spec, cfg
        d = cfg.embed_dim
        self.embedding = FieldEmbedding(spec, d)
        self.user_idx, self.item_idx = split_fields(spec)
        self.user_tower = MLP(len(self.user_idx) * d + 3 * d, cfg.hidden, cfg.dim)
        self.item_tower = MLP(len(self.item_idx) * d, cfg.hidden, cfg.dim)
        if cfg.adaf2m2:
            names = spec.fields
            self.uid, self.iid = self.user_idx.index(names.index("user_idx")), self.item_idx.index(names.index("item_idx"))
            self.user_adapter = TowerAdapter(3, d, len(self.user_idx), cfg.adapter_hidden)
            self.item_adapter = TowerAdapter(1, d, len(self.item_idx), cfg.adapter_hidden)
            self.user_mask = nn.Parameter(torch.randn(len(self.user_idx), d) * 0.05)
            self.item_mask = nn.Parameter(torch.randn(len(self.item_idx), d) * 0.05)

    def loss_weights(self) -> dict[str, float]:
        return {"feature_mask": self.cfg.alpha} if self.cfg.adaf2m2 else {}

    def _towers(self, uf: Tensor, hist: Tensor, itf: Tensor) -> tuple[Tensor, Tensor]:
        u = self.user_tower(torch.cat([uf.flatten(1), hist], -1))
        v = self.item_tower(itf.flatten(1))
        return F.normalize(u, dim=-1), F.normalize(v, dim=-1)

    def _signals(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        st = self.spec.state
        g = lambda n: torch.log1p(batch[st[n]].float().clamp_min(0)).unsqueeze(-1)  # noqa: E731
        return torch.cat([g("active_7"), g("active_30"), g("user_count")], -1), g("item_count")

    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(B, d) user and item embeddings of the serving path, and the parts for the aux loss."""
        emb = self.embedding(batch)
        uf, itf = emb.fields[:, self.user_idx], emb.fields[:, self.item_idx]
        hist = masked_mean(emb.seq, emb.seq_mask)
        parts = {"uf": uf, "itf": itf, "hist": hist}
        if self.cfg.adaf2m2:
            us, its = self._signals(batch)
            uf = uf * self.user_adapter(us, uf[:, self.uid]).unsqueeze(-1)
            itf = itf * self.item_adapter(its, itf[:, self.iid]).unsqueeze(-1)
        u, v = self._towers(uf, hist, itf)
        return u, v, parts

    def encode_users(self, batch: dict[str, Tensor]) -> Tensor:
        return self.encode(batch)[0]

    def encode_items(self, batch: dict[str, Tensor]) -> Tensor:
        return self.encode(batch)[1]

    def encode_item_table(self, items: dict[str, Tensor]) -> Tensor:
        """(N, d) item embeddings from item-side fields only (N,) each — the catalogue for an
        index. The item tower and its adapter read no user field, so the user side is filled
        with zeros and an empty history."""
        n = len(next(iter(items.values())))
        dev = next(iter(items.values())).device
        batch = {f: items[f] if is_item_side(f) else torch.zeros(n, device=dev, dtype=torch.long
                                                                   if f in self.spec.categorical else torch.float32)
                 for f in self.spec.fields}
        batch |= {s: torch.zeros(n, 1, dtype=torch.long, device=dev) for s in SEQ_FIELDS}
        batch["hist_len"] = torch.zeros(n, dtype=torch.long, device=dev)
        return self.encode(batch)[1]

    @property
    def item_fields(self) -> list[str]:
        return [f for f in self.spec.fields if is_item_side(f)]

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        u, v, p = self.encode(batch)
        keys = batch["item_idx"] if "item_key" not in batch else batch["item_key"]
        logq = batch.get("item_logq") if self.cfg.logq else None
        out = ModelOutput(logits=(u * v).sum(-1), main_loss=sampled_softmax_loss(u, v, keys, logq, self.cfg.temperature))
        if self.cfg.adaf2m2 and self.training:
            losses = []
            for _ in range(self.cfg.k):  # k masked copies, each a full in-batch softmax, no adapters
                p_mask = torch.empty(u.shape[0], 1, 1, device=u.device).uniform_(self.cfg.beta, self.cfg.gamma)
                mu = torch.rand(p["uf"].shape[:2], device=u.device).unsqueeze(-1) < p_mask
                mi = torch.rand(p["itf"].shape[:2], device=u.device).unsqueeze(-1) < p_mask
                uc, vc = self._towers(torch.where(mu, self.user_mask, p["uf"]), p["hist"],
                                      torch.where(mi, self.item_mask, p["itf"]))
                losses.append(sampled_softmax_loss(uc, vc, keys, logq, self.cfg.temperature))
            out.aux["feature_mask"] = torch.stack(losses).mean()
        return out


def log_q(item_clicks: Tensor) -> Tensor:
    """log sampling probability per item from training click counts (floored at one click)."""
    c = item_clicks.float().clamp_min(1.0)
    return torch.log(c) - math.log(float(c.sum()))
