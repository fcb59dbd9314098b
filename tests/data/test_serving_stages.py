"""The funnel's stages (serving/funnel.py) on the tiny world's real ingest output, no Ray:
a batch of requests gives exactly what the requests give one by one (what `@serve.batch`
relies on), and a history extended by fed-back clicks changes the scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model
from serving.features import FeatureStore
from serving.funnel import Preranker, Ranker, Retriever, Scored
from serving.index import IndexParams, ItemIndex
from training.retrieval import Catalogue, item_vectors
from training.tasks import RetrievalTask


@pytest.fixture(scope="module")
def store(tiny_processed):
    return FeatureStore(tiny_processed)


def _requests(store, n=5):
    users = [int(u) for u in np.nonzero(store.n_clicks > 0)[0][:n - 1]] + [0]  # + an unknown user (cold start)
    return users, [store.user_history(u) for u in users]


def test_rank_many_equals_rank_one_by_one(store):
    torch.manual_seed(0)
    ranker = Ranker(build_model("cdnet", store.spec, tiny=True), store)
    users, hists = _requests(store)
    rng = np.random.default_rng(0)
    cands = [rng.choice(np.arange(1, 200), size=c, replace=False) for c in (30, 1, 50, 7, 20)]
    reqs = [(u, h, c, 5, 1_702_000_000 + i) for i, (u, h, c) in enumerate(zip(users, hists, cands, strict=True))]
    many = ranker.rank_many(reqs)
    for r, got in zip(reqs, many, strict=True):
        one = ranker.rank(*r)
        np.testing.assert_array_equal(got.keys, one.keys)
        np.testing.assert_allclose(got.scores, one.scores, rtol=1e-5, atol=1e-6)
        assert len(got.keys) == min(5, len(r[2]))


def test_ranker_orders_by_its_logit_plus_the_weighted_prerank_score(store):
    """serve.prerank_weight w: the slate is the top k of ranker logit + w · pre-rank score; the
    scores it returns stay the ranker's probabilities. w = 0 (or no prior) is the ranker alone."""
    torch.manual_seed(0)
    model = build_model("cdnet", store.spec, tiny=True)
    users, hists = _requests(store)
    keys = np.arange(1, 41)
    prior = np.linspace(-3, 3, 40).astype(np.float32)
    alone = Ranker(model, store).rank(users[0], hists[0], keys, 40, 1_702_000_000)
    z = np.log(alone.scores / (1 - alone.scores))  # the ranker's logits, in its own order
    by_key = dict(zip(alone.keys.tolist(), z.tolist(), strict=True))
    fused = Ranker(model, store, prior_weight=2.0)
    got = fused.rank(users[0], hists[0], keys, 10, 1_702_000_000, prior=prior)
    want = keys[np.argsort(-(np.array([by_key[x] for x in keys.tolist()]) + 2.0 * prior), kind="stable")[:10]]
    np.testing.assert_array_equal(got.keys, want)
    assert not np.array_equal(got.keys, alone.keys[:10])  # the prior moved the slate
    np.testing.assert_allclose(got.scores, [alone.scores[alone.keys.tolist().index(x)] for x in got.keys.tolist()],
                               rtol=1e-5)
    same = fused.rank(users[0], hists[0], keys, 10, 1_702_000_000)  # no prior sent: the ranker alone
    np.testing.assert_array_equal(same.keys, alone.keys[:10])


@pytest.mark.parametrize("name", ["karma", "two_tower"])
def test_retrieve_many_equals_retrieve_one_by_one(tiny_processed, store, name):
    torch.manual_seed(0)
    model = RetrievalTask(tiny_processed, seq_len=20).build(name, tiny=True).eval()
    vecs = item_vectors(model, Catalogue.from_dir(tiny_processed)).numpy()
    index = ItemIndex(vecs.shape[1], IndexParams("Flat")).build(np.arange(1, len(vecs) + 1), vecs)
    retr = Retriever(model, index, store, popular_n=10)
    users, hists = _requests(store)
    many = retr.retrieve_many(users, hists, 25)
    for u, h, got in zip(users, hists, many, strict=True):
        one = retr.retrieve(u, h, 25)
        np.testing.assert_array_equal(got.keys, one.keys)
        np.testing.assert_allclose(got.scores, one.scores, rtol=1e-4, atol=1e-5)
    if name == "karma":  # no history, no KARMA vector: the popularity channel only
        assert set(many[-1].keys) == set(store.popular[:10])
    for got, h in zip(many, hists, strict=True):  # n from the index beside the popular 10: n + 10 distinct
        assert len(np.unique(got.keys)) == len(got.keys)
        if len(h) or name == "two_tower":
            assert len(got.keys) == 25 + 10, len(got.keys)


def test_preranking_drops_candidates_not_yet_released(store):
    """The index holds the whole catalogue, future releases too: at ts they are not candidates."""
    torch.manual_seed(0)
    pre = Preranker(build_model("lrea", store.spec, tiny=True), store)
    keys = np.arange(1, 41)
    ts = int(np.median(store.first_seen[keys]))
    assert (store.first_seen[keys] > ts).any()
    u = int(np.nonzero(store.n_clicks > 0)[0][0])
    got = pre.prerank(u, store.user_history(u), Scored(keys, np.zeros(40, np.float32)), 40, ts)
    assert 0 < len(got.keys) < 40 and (store.first_seen[got.keys] <= ts).all()


def test_preranker_orders_by_its_logit_plus_the_weighted_retrieval_score(store):
    """serve.retrieval_weight w: pre-rank score = LREA logit + w · the retriever's score; the top m of that
    (with serve.prerank_weight 1 also the slate's order: configs/small.yaml's w = 20, the two-tower's 1/τ)."""
    torch.manual_seed(0)
    model = build_model("lrea", store.spec, tiny=True)
    u = int(np.nonzero(store.n_clicks > 0)[0][0])
    hist, ts = store.user_history(u), int(store.first_seen.max())
    keys = np.arange(1, 41)
    ret = np.linspace(1, -1, 40).astype(np.float32)
    alone = Preranker(model, store).prerank(u, hist, Scored(keys, ret), 40, ts)
    lrea = dict(zip(alone.keys.tolist(), alone.scores.tolist(), strict=True))
    got = Preranker(model, store, retrieval_weight=20.0).prerank(u, hist, Scored(keys, ret), 10, ts)
    want_s = np.array([lrea[x] for x in keys.tolist()]) + 20.0 * ret
    np.testing.assert_array_equal(got.keys, keys[np.argsort(-want_s, kind="stable")[:10]])
    np.testing.assert_allclose(got.scores, np.sort(want_s)[::-1][:10], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(keys[got.pos], got.keys)  # pos: where each came from in the input
    assert not np.array_equal(got.keys, alone.keys[:10])  # the retriever's score moved the cut


def test_fed_back_clicks_extend_the_history(store):
    u = int(np.nonzero(store.n_clicks > 3)[0][0])
    logged = store.user_history(u)
    recent = np.array([5, 6, 7])
    both = store.user_history(u, recent=recent)
    np.testing.assert_array_equal(both[-3:], recent)
    np.testing.assert_array_equal(both[:-3], logged[-(store.seq_len - 3):] if len(logged) + 3 > store.seq_len
                                  else logged)
    np.testing.assert_array_equal(store.user_history(0, recent=recent), recent)  # a new user: clicks only
    np.testing.assert_array_equal(store.user_history(u, override=np.array([9]), recent=recent), [9])  # request wins


def test_serve_config_file_args_are_the_typed_builder_args():
    """`serve run serving/config.yaml` validates `args:` as FunnelArgs; a misspelt knob is an error naming it."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from serving.app import FunnelArgs

    root = Path(__file__).resolve().parents[2]
    args = yaml.safe_load((root / "serving" / "config.yaml").read_text())["applications"][0]["args"]
    a = FunnelArgs(**args)
    assert a.serve.ranker == "cdnet" and a.abtest.variants["treatment"] == "funnel@champion"
    with pytest.raises(ValidationError, match="serve.retrieve_topn"):
        FunnelArgs(**{**args, "serve": {**args["serve"], "retrieve_topn": 5}})
    with pytest.raises(ValidationError, match="abtest.arms"):
        FunnelArgs(**{**args, "abtest": {"arms": "half"}})


def test_pre_period_ctr_is_each_users_logged_ctr_shrunk_to_the_mean(tiny_processed):
    """The A/B's CUPED covariate: CTR over the logged impressions, per user_id, before the test."""
    import pandas as pd

    from abtest.analysis import pre_period_ctr

    x = pre_period_ctr(tiny_processed, prior=20.0)
    rows = pd.read_parquet(tiny_processed / "ranking", columns=["label", "user_key", "is_sampled_negative"])
    rows = rows[rows["is_sampled_negative"] == 0]
    users = pd.read_parquet(tiny_processed / "users.parquet", columns=["user_id", "user_key"])
    key = rows["user_key"].value_counts().index[0]  # the most exposed user
    uid = str(users.loc[users["user_key"] == key, "user_id"].iloc[0])
    mine = rows[rows["user_key"] == key]["label"]
    assert x[uid] == pytest.approx((mine.sum() + 20.0 * rows["label"].mean()) / (len(mine) + 20.0))
    assert len(x) == rows["user_key"].nunique() and x.between(0, 1).all() and all(isinstance(u, str) for u in x.index)


def test_served_behavior_ages_equal_the_training_batchers(store, tiny_processed):
    """For logged rows, the serving row built from the same history and click times carries the same
    behaviors and the same behavior ages as the training batch (one definition of the feature)."""
    import pandas as pd

    from training.batches import RankingBatcher

    rows = pd.read_parquet(tiny_processed / "ranking" / "split=test").head(200)
    rows = rows[rows["hist_end"] > 0]
    batcher = RankingBatcher(store.spec, store.history, seq_len=store.seq_len)
    train = batcher({c: rows[c].to_numpy() for c in rows.columns})
    g = store.history.gather(rows["user_key"].to_numpy(), rows["hist_end"].to_numpy(), store.seq_len)
    assert len(rows) > 20
    for j in range(len(rows)):
        n = int(g["len"][j])
        keys, ts = g["item_key"][j, store.seq_len - n:], g["click_ts"][j, store.seq_len - n:]
        r = rows.iloc[j]
        served = store.ranking_batch(int(r["user_key"]), keys, np.array([int(r["item_key"])]), int(r["ts"]), hist_ts=ts)
        for f in ("hist_item_idx", "hist_cat_idx", "hist_brand_idx", "hist_age_idx", "hist_len"):
            np.testing.assert_array_equal(served[f][0].numpy(), train[f][j].numpy(), err_msg=f)
    # without the click times every valid behavior's age is unknown (1), padding stays 0
    served = store.ranking_batch(int(rows.iloc[0]["user_key"]), keys, np.array([1]), int(rows.iloc[0]["ts"]))
    assert set(np.unique(served["hist_age_idx"].numpy())) <= {0, 1}


def test_fed_back_clicks_keep_their_times(store):
    u = int(np.nonzero(store.n_clicks > 0)[0][0])
    logged, logged_ts = store.user_history_ts(u)
    keys, ts = store.user_history_ts(u, recent=np.array([3, 4]), recent_ts=np.array([1_800_000_000, 1_800_000_100]))
    np.testing.assert_array_equal(keys[-2:], [3, 4])
    np.testing.assert_array_equal(ts[-2:], [1_800_000_000, 1_800_000_100])
    np.testing.assert_array_equal(ts[:-2], logged_ts[-(len(keys) - 2):] if len(keys) > 2 else [])
    np.testing.assert_array_equal(store.user_history(u, recent=np.array([3, 4])), keys)
    with pytest.raises(ValueError, match="recent_ts"):
        store.user_history_ts(u, recent=np.array([3, 4]), recent_ts=np.array([1]))
