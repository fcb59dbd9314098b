"""CDNet over a served batch: the candidates of one request share one history (`hist_group`).

A /rank request scores C candidates for one user, so its batch holds C copies of one history. The
history side of CDNet's forward (the behaviors' lookup, their projection into the similarity space
and its normalisation) is computed once per distinct history, not once per candidate, when the
batch says which rows share one (`hist_group`, built by serving.funnel.Ranker) and no backward pass
is wanted. The logits are those of the batch without the key.
"""

from __future__ import annotations

import pytest
import torch

from models.cdnet import CDNet, CDNetConfig
from models.spec import AGE_BUCKETS, FeatureSpec
from tests.models.conftest import HIST_VOCAB, make_batch


def served_batch(spec: FeatureSpec, sizes: list[int], lens: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Requests r = 0.. with sizes[r] candidates each and ONE history of lens[r] behaviors per request
    (its rows hold copies of it), concatenated the way Ranker.rank_many does; with `hist_group`."""
    parts = []
    for r, (c, n) in enumerate(zip(sizes, lens, strict=True)):
        b = make_batch(spec, B=c, seed=seed + r)  # candidates and context: per row
        h = make_batch(spec, B=2, seed=seed + 100 + r, lens=[0, n])  # row 1: this request's history
        for f in HIST_VOCAB:
            b[f] = h[f][1:].expand(c, -1).clone()
        b["hist_len"] = torch.full((c,), n)
        g = torch.Generator().manual_seed(seed + 200 + r)
        age = torch.randint(2, AGE_BUCKETS, (spec.seq_len,), generator=g)
        b["hist_age_idx"] = torch.where(b["hist_item_idx"] > 0, age, 0)
        # the target's category among the history's, so the recency token varies across rows
        b["cat_idx"] = torch.where(torch.arange(c) % 2 == 0, h["hist_cat_idx"][1, -1], b["cat_idx"])
        parts.append(b)
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    batch["hist_group"] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return batch


VARIANTS = {
    "paper": {},
    "age+recency": {"behavior_age": True, "category_recency": True},
    "full_sequence": {"full_sequence": True},
    "no core": {"use_core": False},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cdnet_computes_the_history_side_once_per_request_with_the_same_logits(variant):
    spec = FeatureSpec.tiny(seq_len=20)
    torch.manual_seed(0)
    m = CDNet(spec, CDNetConfig(**{**CDNetConfig.tiny().__dict__, "id_dropout": 0.0, **VARIANTS[variant]})).eval()
    b = served_batch(spec, sizes=[5, 3, 1, 6], lens=[9, 0, 4, 20])
    plain = {k: v for k, v in b.items() if k != "hist_group"}
    with torch.inference_mode():
        emb = m.embed(b)
        assert emb.seq.shape[0] == 4 and emb.group is not None  # one history per request, not per row
        if emb.seq_age is not None:
            assert emb.seq_age.shape[0] == 4
        assert m.embed(plain).seq.shape[0] == 15
        got, want = m(b).logits, m(plain).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    one = served_batch(spec, sizes=[7], lens=[11])  # one request: the history broadcast, no gather
    with torch.inference_mode():
        assert torch.allclose(m(one).logits, m({k: v for k, v in one.items() if k != "hist_group"}).logits, atol=1e-5)


def test_cdnet_ignores_the_group_when_a_backward_pass_is_wanted():
    """Training and gradient checks see every row's own behaviors (the STE's gradient reaches each)."""
    spec = FeatureSpec.tiny(seq_len=20)
    torch.manual_seed(0)
    m = CDNet(spec, CDNetConfig.tiny()).eval()
    b = served_batch(spec, sizes=[4, 2], lens=[6, 12])
    emb = m.embed(b)
    assert emb.seq.shape[0] == 6 and emb.group is None
    z = m(b).logits
    z.sum().backward()
    assert m.proj_sim.weight.grad is not None and m.proj_sim.weight.grad.abs().sum() > 0
