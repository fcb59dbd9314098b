"""The behaviors' age at the request time (models.spec.behavior_age_bucket) and CDNet's use of it.

The ground-truth world's click model rewards a user's *current* short-term category (it moves
every few hours), so a ranker that cannot tell a click of an hour ago from one of last month
cannot separate the current interest from the other long-term ones. CDNet as the paper writes it
reads item-side features only; `behavior_age=True` adds the age to its core tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cdnet import CDNet, CDNetConfig
from models.spec import AGE_BUCKETS, FeatureSpec, behavior_age_bucket
from tests.models.conftest import make_batch

H = 3600


def test_age_buckets_by_hand():
    ts = np.array([1_000_000_000])
    click = 1_000_000_000 - np.array([[0, 30 * 60, H, 3 * H, 7 * H, 30 * 86_400, 400 * 86_400, 0]])
    click[0, -1] = 0  # unknown time
    valid = np.array([[True] * 7 + [True]])
    got = behavior_age_bucket(ts, click, valid)
    # 2 + floor(log2(1 + hours)): 0 h → 2, 0.5 h → 2, 1 h → 3, 3 h → 4, 7 h → 5, 720 h → 11, capped 13; unknown 1
    assert got.tolist() == [[2, 2, 3, 4, 5, 11, AGE_BUCKETS - 1, 1]]
    assert behavior_age_bucket(ts, click, np.zeros_like(valid)).tolist() == [[0] * 8]  # padding


def _recency_task(spec: FeatureSpec, B: int, seed: int) -> dict[str, torch.Tensor]:
    """Every row has one behavior of the target's category at a random position; the label is
    whether that click is recent (under 2 h) or old (over 10 days) — the same layout either way,
    so only the age tells the classes apart."""
    g = np.random.default_rng(seed)
    L, C = spec.seq_len, spec.categorical["cat_idx"]
    batch = make_batch(spec, B=B, seed=seed, lens=[L] * B)
    target_cat = g.integers(2, C, size=B)
    other = (target_cat[:, None] - 2 + g.integers(1, C - 2, size=(B, L))) % (C - 2) + 2  # never the target's
    pos = g.integers(0, L, size=B)
    cats = other.copy()
    cats[np.arange(B), pos] = target_cat
    label = g.random(B) < 0.5
    age = g.integers(6, AGE_BUCKETS, size=(B, L))  # the other clicks: any age over ~1 day
    age[np.arange(B), pos] = np.where(label, g.integers(2, 4, size=B), g.integers(10, AGE_BUCKETS, size=B))
    batch["cat_idx"] = torch.as_tensor(target_cat)
    batch["hist_cat_idx"] = torch.as_tensor(cats)
    batch["hist_item_idx"] = torch.ones(B, L, dtype=torch.long)  # item ids carry nothing here
    batch["hist_brand_idx"] = torch.ones(B, L, dtype=torch.long)
    batch["item_idx"] = torch.ones(B, dtype=torch.long)
    batch["brand_idx"] = torch.ones(B, dtype=torch.long)
    batch["hist_age_idx"] = torch.as_tensor(age)
    batch["label"] = torch.as_tensor(label.astype(np.float32))
    return batch


def _fit_auc(behavior_age: bool, category_recency: bool = False) -> float:
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    spec = FeatureSpec.tiny(seq_len=12, short_len=4)
    m = CDNet(spec, CDNetConfig(**{**CDNetConfig.tiny().__dict__, "behavior_age": behavior_age,
                                  "category_recency": category_recency, "id_dropout": 0.0}))
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    for step in range(60):
        b = _recency_task(spec, 128, seed=step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(b).logits, b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    test = _recency_task(spec, 1000, seed=10_000)
    with torch.no_grad():
        return float(roc_auc_score(test["label"].numpy(), m(test).logits.numpy()))


def test_cdnet_with_behavior_age_learns_what_recency_decides_and_without_it_cannot():
    with_age, without = _fit_auc(True), _fit_auc(False)
    assert with_age > 0.9, with_age
    assert without < 0.6, without


def test_cdnet_with_the_category_recency_token_learns_it_too():
    assert _fit_auc(False, category_recency=True) > 0.9


def test_category_recency_is_the_age_of_the_latest_same_category_behavior():
    from models.layers import category_recency

    seq_cat = torch.tensor([[0, 5, 3, 5, 2], [0, 0, 1, 2, 2], [0, 0, 0, 0, 0]])
    age = torch.tensor([[0, 9, 7, 4, 2], [0, 0, 6, 3, 3], [0, 0, 0, 0, 0]])
    mask = seq_cat > 0
    got = category_recency(seq_cat, torch.tensor([5, 4, 5]), age, mask)
    assert got.tolist() == [4, 1, 1]  # the later of the two 5s; no 4 in row 1; row 2 has no history


def test_behavior_age_changes_only_the_tokens_not_the_similarity():
    spec = FeatureSpec.tiny()
    torch.manual_seed(0)
    m = CDNet(spec, CDNetConfig(**{**CDNetConfig.tiny().__dict__, "behavior_age": True})).eval()
    b = make_batch(spec, B=6, seed=1)
    b["hist_age_idx"] = torch.where(b["hist_item_idx"] > 0, 2, 0)
    emb = m.embedding(b)
    sim = m.similarity(emb)
    b2 = dict(b, hist_age_idx=torch.where(b["hist_item_idx"] > 0, 12, 0))
    emb2 = m.embedding(b2)
    torch.testing.assert_close(m.similarity(emb2), sim)  # the selection is the paper's
    assert not torch.allclose(m(b).logits[1:], m(b2).logits[1:])  # row 0 has no history
    torch.testing.assert_close(m(b).logits[:1], m(b2).logits[:1])


@pytest.mark.parametrize("knob", ["behavior_age", "category_recency"])
def test_a_model_built_with_the_age_names_the_missing_input(knob):
    spec = FeatureSpec.tiny()
    m = CDNet(spec, CDNetConfig(**{**CDNetConfig.tiny().__dict__, knob: True}))
    with pytest.raises(KeyError, match="hist_age_idx"):
        m(make_batch(spec, B=4))
