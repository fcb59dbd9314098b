"""The leakage property: no feature of an example uses an event at or after its ts.

Checked two ways on random logs with many timestamp ties: (1) every counter
equals a brute-force count over events strictly before ts, and the gathered
history holds only clicks strictly before ts; (2) deleting every event at or
after a cut T leaves the features of all examples before T unchanged.
"""

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.examples import ExampleContext, annotate_user_events, item_counters
from pipeline.history import HistoryStore

FEATURES = ["hist_end", "user_exposures_before", "user_clicks_before", "user_active_days_7",
            "user_active_days_30", "item_exposures_before", "item_clicks_before"]
DAY = 86_400

event = st.tuples(
    st.integers(1, 3),  # user
    st.integers(1, 6),  # item
    st.integers(0, 40).map(lambda x: x * DAY // 4),  # ts, coarse: ties are common
    st.sampled_from(["impression", "impression", "click", "fav"]),
    st.integers(-1, 4),  # request (-1 = none)
)


def frame(rows):
    df = pd.DataFrame(rows, columns=["user_key", "item_key", "ts", "event", "request_id"])
    df["position"] = -1
    return df


def features(df: pd.DataFrame, has_imp: bool) -> pd.DataFrame:
    ctx = ExampleContext(has_impressions=has_imp, num_negatives=2, item_weights=np.r_[0.0, np.ones(6)])
    a = annotate_user_events(df, ctx)
    exp = a[a["is_exposure"] & ~a["dup"]]
    return item_counters(exp)


@settings(max_examples=60, deadline=None)
@given(st.lists(event, min_size=1, max_size=40), st.booleans())
def test_features_equal_brute_force_over_the_strict_past(rows, has_imp):
    ex = features(frame(rows), has_imp)
    clicks = ex[ex["label"] == 1]
    valid = frame(rows).drop_duplicates()
    for r in ex.itertuples():
        mine_clicks = clicks[(clicks.user_key == r.user_key) & (clicks.click_ts < r.ts)]
        assert r.hist_end == len(mine_clicks)
        logged = ex[ex.event != "sampled_negative"]
        assert r.user_exposures_before == ((logged.user_key == r.user_key) & (logged.ts < r.ts)).sum()
        assert r.item_exposures_before == ((logged.item_key == r.item_key) & (logged.ts < r.ts)).sum()
        assert r.item_clicks_before == ((clicks.item_key == r.item_key) & (clicks.click_ts < r.ts)).sum()
        past = valid[(valid.user_key == r.user_key) & (valid.ts < r.ts) & (valid.ts >= r.ts - 7 * DAY)]
        assert r.user_active_days_7 == past["ts"].floordiv(DAY).nunique()
    # the gathered history holds only clicks strictly before each example's ts
    items = pd.DataFrame({"item_key": range(1, 7), "item_idx": range(2, 8), "cat_idx": 2, "brand_idx": 2})
    hs = HistoryStore(clicks[["user_key", "click_ts", "item_key"]], items)
    g = hs.gather(ex["user_key"].to_numpy(), ex["hist_end"].to_numpy(), 8)
    filled = g["item_key"] > 0
    assert (np.where(filled, g["click_ts"], -1) < ex["ts"].to_numpy()[:, None]).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(event, min_size=1, max_size=40), st.integers(0, 40), st.booleans())
def test_deleting_the_future_changes_no_past_feature(rows, cut, has_imp):
    T = cut * DAY // 4
    full = features(frame(rows), has_imp)
    trunc_rows = [r for r in rows if r[2] < T]
    if not trunc_rows:
        return
    trunc = features(frame(trunc_rows), has_imp)
    key = ["user_key", "item_key", "ts", "request_id", "event"]
    a = full[full["ts"] < T].sort_values(key)[key + FEATURES].reset_index(drop=True)
    b = trunc[trunc["ts"] < T].sort_values(key)[key + FEATURES].reset_index(drop=True)
    if not has_imp:  # sampled negatives are random draws: compare the logged rows
        a, b = a[a.event != "sampled_negative"].reset_index(drop=True), b[b.event != "sampled_negative"].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def _prior_rows(rows):
    from pipeline.examples import PastPrior, daily_counts

    ex = features(frame(rows), True)
    return ex, PastPrior.from_counts(daily_counts(ex)).at(ex["ts"].to_numpy())


@settings(max_examples=60, deadline=None)
@given(st.lists(event, min_size=1, max_size=40), st.integers(0, 40))
def test_the_ctr_smoothing_prior_is_past_only(rows, cut):
    """Each row's prior is the logged CTR of exposures before its day (clicks by their own time);
    deleting every event at or after T changes no prior of a row before T."""
    from pipeline.examples import DEFAULT_PRIOR

    ex, prior = _prior_rows(rows)
    logged = ex[ex.event != "sampled_negative"]
    clicks = ex[ex.label == 1]
    for p, ts in zip(prior, ex["ts"], strict=True):
        start = ts // DAY * DAY
        n, c = (logged.ts < start).sum(), (clicks.click_ts < start).sum()
        assert p == np.clip(c / n, 1e-4, 1 - 1e-4) if n else p == DEFAULT_PRIOR
    T = cut * DAY // 4
    trunc_rows = [r for r in rows if r[2] < T]
    if trunc_rows:
        ex_t, prior_t = _prior_rows(trunc_rows)
        key = ["user_key", "item_key", "ts", "request_id", "event"]
        a = ex.assign(prior=prior)[lambda d: d.ts < T].sort_values(key)[[*key, "prior"]].reset_index(drop=True)
        b = ex_t.assign(prior=prior_t)[lambda d: d.ts < T].sort_values(key)[[*key, "prior"]].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(event, min_size=1, max_size=40), st.lists(st.integers(-1, 40), min_size=6, max_size=6))
def test_sampled_negatives_are_items_available_at_ts(rows, released_quarter_days):
    """Without impressions, negatives are sampled: never an item released after the example's ts."""
    first_seen = np.r_[-1, [q * DAY // 4 if q >= 0 else -1 for q in released_quarter_days]].astype(np.int64)
    ctx = ExampleContext(has_impressions=False, num_negatives=3, item_weights=np.r_[0.0, np.ones(6)],
                         item_first_seen=first_seen)
    a = annotate_user_events(frame(rows), ctx)
    neg = a[a["event"] == "sampled_negative"]
    assert (first_seen[neg["item_key"].to_numpy()] <= neg["ts"].to_numpy()).all()
