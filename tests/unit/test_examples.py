"""Unit tests of the pure example transforms (no Ray)."""

import numpy as np
import pandas as pd
import pytest

from pipeline.examples import (
    ExampleContext,
    annotate_user_events,
    count_before,
    distinct_days_between,
    item_counters,
    smoothed_ctr,
)
from pipeline.history import HistoryStore

DAY = 86_400


def ev(rows):
    df = pd.DataFrame(rows, columns=["user_key", "item_key", "ts", "event", "request_id", "position"])
    return df.astype({"user_key": np.int64, "item_key": np.int64, "ts": np.int64, "request_id": np.int64,
                      "position": np.int64})


def test_count_before_matches_brute_force():
    rng = np.random.default_rng(0)
    g_ref, t_ref = rng.integers(0, 5, 200), rng.integers(0, 50, 200)
    g_q, t_q = rng.integers(0, 6, 100), rng.integers(-5, 60, 100)
    got = count_before(g_ref, t_ref, g_q, t_q)
    want = [((g_ref == g) & (t_ref < t)).sum() for g, t in zip(g_q, t_q, strict=True)]
    assert got.tolist() == want
    got_le = count_before(g_ref, t_ref, g_q, t_q, strict=False)
    assert got_le.tolist() == [((g_ref == g) & (t_ref <= t)).sum() for g, t in zip(g_q, t_q, strict=True)]


def test_distinct_days_matches_brute_force():
    rng = np.random.default_rng(1)
    g, t = rng.integers(0, 3, 300), rng.integers(0, 40 * DAY, 300)
    gq, tq = rng.integers(0, 3, 50), rng.integers(0, 45 * DAY, 50)
    got = distinct_days_between(g, t, gq, tq - 7 * DAY, tq)
    want = [len(np.unique(t[(g == a) & (t >= b - 7 * DAY) & (t < b)] // DAY)) for a, b in zip(gq, tq, strict=True)]
    assert got.tolist() == want


def test_duplicates_are_flagged_once():
    out = annotate_user_events(ev([[1, 5, 100, "impression", 7, 0], [1, 5, 100, "impression", 7, 0],
                                   [1, 5, 100, "impression", 7, 0], [1, 6, 100, "impression", 7, 1]]), ExampleContext())
    assert out["dup"].sum() == 2
    assert out["is_exposure"].sum() == 2


def test_click_pairs_with_its_impression_by_request():
    out = annotate_user_events(ev([[1, 5, 100, "impression", 7, 0], [1, 6, 100, "impression", 7, 1],
                                   [1, 5, 112, "click", 7, 0]]), ExampleContext())
    exp = out[out["is_exposure"]].set_index("item_key")
    assert exp.loc[5, "label"] == 1 and exp.loc[5, "click_ts"] == 112
    assert exp.loc[6, "label"] == 0
    assert len(exp) == 2  # the click row is not a second exposure
    clicked = out[(out["is_exposure"]) & (out["label"] == 1)].iloc[0]
    assert clicked["hard_neg_0"] == 6 and clicked["hard_neg_1"] == 0


def test_click_pairs_without_request_within_window_only():
    rows = [[1, 5, 100, "impression", -1, -1], [1, 5, 150, "click", -1, -1],   # paired
            [1, 6, 100, "impression", -1, -1], [1, 6, 100 + 7200, "click", -1, -1],  # too late: own exposure
            [1, 7, 300, "click", -1, -1]]  # no impression at all (MovieLens-style)
    out = annotate_user_events(ev(rows), ExampleContext(pair_window_s=3600))
    exp = out[out["is_exposure"]]
    assert len(exp) == 4
    assert exp["label"].sum() == 3
    assert exp.set_index(["item_key", "ts"]).loc[(6, 100), "label"] == 0


def test_second_click_on_one_impression_merges():
    out = annotate_user_events(ev([[1, 5, 100, "impression", 7, 0], [1, 5, 110, "click", 7, 0],
                                   [1, 5, 130, "click", 7, 0]]), ExampleContext())
    exp = out[out["is_exposure"]]
    assert len(exp) == 1 and exp["click_ts"].iloc[0] == 110


def test_history_and_counters_are_strictly_before():
    rows = [[1, 5, 100, "impression", 1, 0], [1, 5, 110, "click", 1, 0],
            [1, 6, 110, "impression", 2, 0],  # same second as the click: the click must not be in its history
            [1, 7, 200, "impression", 3, 0]]
    out = annotate_user_events(ev(rows), ExampleContext())
    exp = out[out["is_exposure"]].set_index("item_key")
    assert exp.loc[5, "hist_end"] == 0
    assert exp.loc[6, "hist_end"] == 0
    assert exp.loc[7, "hist_end"] == 1
    assert exp.loc[7, "user_exposures_before"] == 2
    assert exp.loc[5, "user_active_days_7"] == 0  # nothing strictly before


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_sampled_negatives_never_hit_a_clicked_item(sampling):
    rng = np.random.default_rng(2)
    n_items = 12
    rows = [[u, int(rng.integers(1, n_items)), int(t), "click", -1, -1]
            for u in range(1, 4) for t in np.sort(rng.integers(0, 10_000, 30))]
    w = np.r_[0.0, np.ones(n_items - 1)]
    w[1] = 50.0  # a very popular item: many draws will want it
    ctx = ExampleContext(has_impressions=False, num_negatives=4, negative_sampling=sampling, item_weights=w)
    out = annotate_user_events(ev(rows), ctx)
    exp = out[out["is_exposure"]]
    neg, pos = exp[exp["label"] == 0], exp[exp["label"] == 1]
    assert len(neg) > 0 and (neg["event"] == "sampled_negative").all()
    assert len(neg) <= 4 * len(pos)
    for _, r in neg.iterrows():  # slow reference, tiny data
        clicked = pos[(pos.user_key == r.user_key) & (pos.click_ts <= r.ts)]["item_key"]
        assert r.item_key not in set(clicked)
        assert r.item_key != 0


def test_item_counters():
    df = pd.DataFrame({"item_key": [1, 1, 1, 2], "ts": [10, 20, 20, 5], "label": [1, 0, 1, 0], "event": "impression",
                       "click_ts": [15, np.iinfo(np.int64).max, 25, np.iinfo(np.int64).max]})
    out = item_counters(df)
    assert out["item_exposures_before"].tolist() == [0, 1, 1, 0]
    assert out["item_clicks_before"].tolist() == [0, 1, 1, 0]


def test_smoothed_ctr_shrinks_to_prior():
    assert smoothed_ctr(np.array([0]), np.array([0]), 0.1, 20)[0] == pytest.approx(0.1)
    assert smoothed_ctr(np.array([500]), np.array([1000]), 0.1, 20)[0] == pytest.approx(0.49, abs=0.01)


def test_history_store_gathers_the_last_clicks_left_padded():
    clicks = pd.DataFrame({"user_key": [1, 1, 1, 2], "click_ts": [10, 20, 30, 5], "item_key": [3, 4, 5, 3]})
    items = pd.DataFrame({"item_key": [1, 2, 3, 4, 5], "item_idx": [2, 3, 4, 5, 6], "cat_idx": [2, 2, 3, 3, 4],
                          "brand_idx": [2, 2, 2, 2, 2]})
    hs = HistoryStore(clicks, items)
    g = hs.gather(np.array([1, 1, 2, 3]), np.array([2, 3, 1, 0]), 2)
    assert g["item_key"].tolist() == [[3, 4], [4, 5], [0, 3], [0, 0]]
    assert g["item_idx"].tolist() == [[4, 5], [5, 6], [0, 4], [0, 0]]
    assert g["len"].tolist() == [2, 2, 1, 0]
