"""One test per fix of the ranking-models issue: each fails on the old behaviour.

Numeric inputs (standardised, train-only statistics), unpadded hour/dow, the output bias,
OOV dropout; CDNet's similarity and STE; LREA's init and rank; AdaF2M2's sequence mask, its
L_aux sum and the wrapped model's aux terms; DLF's switches; DIN without softmax.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from models import build_model, loss_terms
from models.cdnet import CDNet, CDNetConfig, select_core
from models.dlf import DLF, DLFConfig
from models.layers import FieldEmbedding, TargetAttention
from models.lrea import LREA, LREAConfig
from models.spec import FeatureSpec
from tests.models.conftest import make_batch

# names the fixes added are imported inside the tests, so that on the old tree each test
# fails on its own (not the whole file at collection)

# --------------------------------------------------------------------------- numeric inputs


def _spec_with_stats(spec: FeatureSpec, batch) -> FeatureSpec:
    from models.spec import numeric_transform

    stats = {}
    for n, kind in spec.numeric.items():
        x = numeric_transform(batch[n].numpy(), kind)
        stats[n] = (float(x.mean()), float(x.std()))
    out = spec.subset(lambda _: True)
    out.numeric_stats = stats
    return out


def test_numeric_fields_arrive_standardised(spec):
    batch = make_batch(spec, B=256, seed=3)
    batch["item_ctr"] = torch.rand(256) * 0.3  # a rate
    emb = FieldEmbedding(_spec_with_stats(spec, batch), 8)
    z = emb.numeric(batch)  # (B, n_num)
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(z.shape[1]), atol=1e-3)


@pytest.mark.parametrize("kind", ["log1p", "logit", "none"])
def test_numpy_and_torch_transforms_agree(kind):
    from models.spec import numeric_transform

    x = np.array([-1.0, 0.0, 1e-6, 0.05, 0.5, 0.9999999, 1.0, 3.0, 250.0])
    spec = FeatureSpec(categorical={"item_idx": 3, "cat_idx": 3, "brand_idx": 3}, numeric={"x": kind})
    emb = FieldEmbedding(spec, 4)
    got = emb.numeric({"x": torch.tensor(x, dtype=torch.float32)})[:, 0].numpy()
    assert np.allclose(got, numeric_transform(x, kind), atol=1e-4)


def test_click_rates_become_log_odds_and_counts_log1p():
    from models.spec import numeric_transform
    from pipeline.outputs import NUMERIC_FIELDS

    assert NUMERIC_FIELDS["item_ctr"] == NUMERIC_FIELDS["user_ctr"] == "logit"
    assert NUMERIC_FIELDS["item_clicks_before"] == "log1p"
    assert math.isclose(numeric_transform(np.array([0.2]), "logit")[0], math.log(0.25))


def _rows(split: str, n: int, seed: int) -> pd.DataFrame:
    from pipeline.outputs import NUMERIC_FIELDS

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({f: rng.integers(0, 50, n).astype(float) for f in NUMERIC_FIELDS})
    df["user_ctr"] = df["item_ctr"] = rng.uniform(0.01, 0.3, n)
    df["split"] = split
    return df


def test_numeric_statistics_come_from_train_rows_only():
    from models.spec import numeric_transform
    from pipeline.outputs import NUMERIC_FIELDS, combine_moments, numeric_moments

    train = _rows("train", 500, 0)
    val, test = _rows("val", 300, 1), _rows("test", 300, 2)
    stats = combine_moments(pd.concat([numeric_moments(p) for p in (train.iloc[:200], train.iloc[200:], val, test)]))
    for f, kind in NUMERIC_FIELDS.items():
        x = numeric_transform(train[f].to_numpy(), kind)
        assert np.allclose(stats[f], (x.mean(), x.std()), atol=1e-9)
    val[list(NUMERIC_FIELDS)] *= 1000  # val and test values do not move the statistics
    test[list(NUMERIC_FIELDS)] = 0
    again = combine_moments(pd.concat([numeric_moments(p) for p in (train, val, test)]))
    assert all(np.allclose(again[f], stats[f]) for f in NUMERIC_FIELDS)


def test_hour_zero_and_monday_are_values_not_padding(spec):
    spec = spec.subset(lambda _: True)
    spec.categorical["dow"] = 7
    emb = FieldEmbedding(spec, 8)
    assert emb.tables["hour"].padding_idx is None and emb.tables["dow"].padding_idx is None
    assert emb.tables["hour"].weight[0].abs().sum() > 0
    assert emb.tables["position"].padding_idx == 0  # position 0 = unknown stays padding
    batch = make_batch(spec, B=4)
    batch["hour"] = torch.zeros(4, dtype=torch.long)
    emb(batch).fields.sum().backward()
    assert emb.tables["hour"].weight.grad[0].abs().sum() > 0  # midnight is trained


@pytest.mark.parametrize("name", ["mean_pool", "din", "dcnv2", "cdnet", "dlf", "lrea", "sim_hard", "adaf2m2:dcnv2"])
def test_output_bias_starts_at_the_train_positive_rate(name, spec):
    spec = spec.subset(lambda _: True)
    spec.label_rate = 0.096
    torch.manual_seed(0)
    m = build_model(name, spec, tiny=True).eval()
    base = m.base if name.startswith("adaf2m2") else m
    assert math.isclose(float(base.output_layer().bias.detach()), math.log(0.096 / 0.904), rel_tol=1e-6)
    with torch.no_grad():
        p = torch.sigmoid(m(make_batch(spec, B=64)).logits).mean()
    assert abs(float(p) - 0.096) < 0.06  # not p = 0.5


def test_oov_row_is_trained_by_id_dropout(spec):
    torch.manual_seed(0)
    emb = FieldEmbedding(spec, 8, id_dropout=0.3)
    batch = make_batch(spec, B=256)
    emb.train()
    emb(batch).fields.sum().backward()
    assert emb.tables["user_idx"].weight.grad[1].abs().sum() > 0  # the OOV row gets a gradient
    assert emb.tables["cat_idx"].weight.grad[1].abs().sum() == 0 or (batch["cat_idx"] == 1).any()
    emb.eval()
    with torch.no_grad():  # eval: no dropout, the same output twice
        assert torch.equal(emb(batch).fields, emb(batch).fields)
    ids = emb.train().ids("user_idx", batch)
    frac = float((ids == 1).float().mean())
    assert 0.2 < frac < 0.4


# --------------------------------------------------------------------------- CDNet


def test_cdnet_similarity_of_an_item_with_itself_is_one_at_init(spec):
    torch.manual_seed(0)
    m = CDNet(spec, CDNetConfig.tiny()).eval()  # eval: no id dropout on the target
    batch = make_batch(spec, B=8, lens=[spec.seq_len] * 8)
    for f, s in (("item_idx", "hist_item_idx"), ("cat_idx", "hist_cat_idx"), ("brand_idx", "hist_brand_idx")):
        batch[s][:, -1] = batch[f]  # the most recent behavior is the target itself
    sim = m.similarity(m.embed(batch))[1:]  # row 0 of make_batch has an empty history
    assert torch.allclose(sim[:, -1], torch.ones(7), atol=1e-5)
    assert (sim[:, :-1] < 1 - 1e-3).all()


def test_cdnet_histogram_spreads_over_bins_at_init(spec):
    torch.manual_seed(0)
    m = CDNet(spec, CDNetConfig(embed_dim=16, sim_dim=16, bins=10)).eval()
    batch = make_batch(spec, B=64, lens=[spec.seq_len] * 64)
    with torch.no_grad():
        sim = m.similarity(m.embed(batch))[1:]  # (63, L)
    bins_per_row = torch.tensor([torch.unique(((r + 1) * 5).floor().clamp(0, 9)).numel() for r in sim]).float()
    # two unrelated biased projections made the cosine a near-constant: ~2.3 bins a row, row std ~0.07
    assert bins_per_row.mean() >= 4 and sim.std(1).mean() > 0.15


def test_ste_gradient_reaches_every_valid_behavior():
    from models.cdnet import core_behaviors

    torch.manual_seed(0)
    B, L, Db = 6, 20, 5
    sim = (torch.rand(B, L) * 2 - 1).requires_grad_()
    seq = torch.randn(B, L, Db)
    lens = torch.tensor([20, 15, 10, 5, 1, 0])
    mask = torch.arange(L)[None, :] >= (L - lens)[:, None]
    seq = seq * mask.unsqueeze(-1)
    chosen, selected = core_behaviors(seq, mask, sim, 0.2, 0.5)
    idx = select_core(sim.detach(), mask, 0.2, 0.5)[0]
    # forward: exactly the selected behaviors
    want = seq.gather(1, idx.unsqueeze(-1).expand(-1, -1, Db)) * selected.unsqueeze(-1)
    assert torch.allclose(chosen * selected.unsqueeze(-1), want, atol=1e-6)
    (chosen * torch.randn_like(chosen)).sum().backward()
    g = sim.grad
    assert (g[mask] != 0).all()  # every valid behavior, selected or not (the old STE: only the k)
    assert (g[~mask] == 0).all()


def test_ste_temperature_follows_the_score_spread():
    torch.manual_seed(0)
    sim = torch.rand(4, 30) * 0.02 + 0.5  # near-constant scores
    mask = torch.ones(4, 30, dtype=torch.bool)

    def soft_grad(s):
        s = s.clone().requires_grad_()
        select_core(s, mask, 0.2, 0.5)[2].sum().backward()
        return s.grad

    a, b = soft_grad(sim), soft_grad(sim * 50)  # the same ranking at 50x the spread
    assert torch.allclose(a, 50 * b, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------- LREA


def test_lrea_initial_compression_is_not_rank_one(spec):
    m = LREA(spec, LREAConfig.tiny())
    prod = m.w_comp @ m.w_decomp  # (L, L)
    rank = torch.linalg.matrix_rank(prod.detach())
    assert rank == min(LREAConfig.tiny().rank, spec.seq_len) and rank > 1
    assert (m.w_comp >= 0).all() and (m.w_decomp >= 0).all()  # the absorbed path is exact at init
    assert torch.allclose(m.w_comp.sum(0), torch.ones(m.cfg.rank))  # each column a bucket mean


def test_lrea_default_rank_is_the_papers_best():
    assert 64 <= LREAConfig().rank <= 128


def test_lrea_attention_tells_behaviors_apart_at_init():
    spec = FeatureSpec.tiny(seq_len=40)
    m = LREA(spec, LREAConfig(embed_dim=8, rank=8, attention_hidden=8, hidden=[16]))
    sv = torch.linalg.svdvals((m.w_comp @ m.w_decomp).detach())
    # a uniform positive init is dominated by one direction (σ2/σ1 ≈ 0.1: every ẽ_j nearly the same
    # average); recency buckets give r equal directions
    assert sv[1] / sv[0] > 0.5 and (sv[:8] > 1e-3).all()


# --------------------------------------------------------------------------- AdaF2M2


def test_adaf2m2_masks_and_weights_the_sequence(spec):
    torch.manual_seed(0)
    m = build_model("adaf2m2:mean_pool", spec, tiny=True)
    m.cfg.beta = m.cfg.gamma = 1.0  # everything masked
    batch = make_batch(spec, B=4, lens=[spec.seq_len, 3, 0, 5])
    emb = m.base.embed(batch)
    copies, drop = m.masked_copies(emb)
    assert drop.shape[-1] == spec.num_fields + 1 and drop.all()
    valid = copies.seq_mask
    assert torch.allclose(copies.seq[valid], m.seq_mask_embedding.expand(int(valid.sum()), -1))
    assert (copies.seq[~valid] == 0).all()
    w = m.field_weights(batch, emb)
    assert w.shape == (4, spec.num_fields + 1)
    adapted = m.adapted(batch, emb)
    assert torch.allclose(adapted.seq, emb.seq * w[:, -1:, None])


def test_adaf2m2_aux_loss_sums_over_the_k_copies(spec):
    torch.manual_seed(0)
    m = build_model("adaf2m2:dcnv2", spec, {"base": {"embed_dim": 8, "hidden": [16]}, "adaf2m2": {"k": 3}}).train()
    batch = make_batch(spec, B=16)
    out = m(batch)
    lg = out.aux_logits["feature_mask"]
    y = batch["label"]
    per_copy = [torch.nn.functional.binary_cross_entropy_with_logits(lg[:, j], y) for j in range(3)]
    assert torch.allclose(loss_terms(out, y)["feature_mask"], sum(per_copy), atol=1e-5)


def test_adaf2m2_default_is_one_copy():
    from models.adaf2m2 import AdaF2M2Config

    assert AdaF2M2Config().k == 1


def test_adaf2m2_around_lrea_keeps_lreas_aux_loss(spec):
    torch.manual_seed(0)
    m = build_model("adaf2m2:lrea", spec, tiny=True).train()
    out = m(make_batch(spec, B=8))
    assert "non_neg" in out.aux and "feature_mask" in out.aux_logits
    assert m.loss_weights() == {"non_neg": LREAConfig.tiny().lam, "feature_mask": m.cfg.alpha}


# --------------------------------------------------------------------------- DLF, DIN


def test_dlf_follows_eq_9_without_layer_norm_by_default(spec):
    plain, normed = DLF(spec, DLFConfig.tiny()), DLF(spec, DLFConfig(**vars(DLFConfig.tiny()) | {"post_norm": True}))
    assert all(layer.norm is None for layer in plain.layers)
    assert all(isinstance(layer.norm, torch.nn.LayerNorm) for layer in normed.layers)


def test_dlf_single_fc_head_of_eq_16(spec):
    m = DLF(spec, DLFConfig(**vars(DLFConfig.tiny()) | {"head": "linear"}))
    assert len([x for x in m.head.net if isinstance(x, torch.nn.Linear)]) == 1
    with pytest.raises(ValueError, match="head"):
        DLFConfig(head="deep")


def test_din_without_softmax_keeps_the_intensity_of_interest():
    torch.manual_seed(0)
    q, keys = torch.randn(3, 6), torch.randn(3, 4, 6)
    twice = torch.cat([keys, keys], 1)
    m4, m8 = torch.ones(3, 4, dtype=torch.bool), torch.ones(3, 8, dtype=torch.bool)
    soft, raw = TargetAttention(6, [8]), TargetAttention(6, [8], normalize="none")
    raw.load_state_dict(soft.state_dict())
    with torch.no_grad():
        assert torch.allclose(soft(q, twice, m8), soft(q, keys, m4), atol=1e-5)  # softmax: a repeat changes nothing
        assert torch.allclose(raw(q, twice, m8), 2 * raw(q, keys, m4), atol=1e-5)  # raw: twice the interest
