import numpy as np
import pandas as pd
import pytest

from configs import WorldConfig
from pipeline.simulator import generate_block, num_blocks, simulate_local
from pipeline.world import World, get_world, hash_uniform

SMALL = WorldConfig(num_users=120, num_items=200, num_categories=5, brands_per_category=3, log_days=20,
                    users_per_block=40)


@pytest.fixture(scope="module")
def tables():
    return simulate_local(SMALL)


def test_same_seed_same_logs_and_blocks_are_independent(tables):
    ev, _, _ = tables
    again = pd.concat([generate_block(World(SMALL), b) for b in reversed(range(num_blocks(SMALL)))])
    key = ["user_id", "ts", "event", "item_id", "request_id"]
    pd.testing.assert_frame_equal(
        ev.sort_values(key).reset_index(drop=True), again.sort_values(key).reset_index(drop=True)
    )
    other = simulate_local(WorldConfig(**{**SMALL.__dict__, "seed": 8}))[0]
    assert len(other) != len(ev) or not other["item_id"].equals(ev["item_id"])


def test_canonical_tables(tables):
    ev, items, users = tables
    assert list(ev.columns) == ["user_id", "item_id", "ts", "event", "request_id", "position"]
    assert set(ev["event"]) == {"impression", "click"}
    assert {"item_id", "category", "brand", "title", "first_seen_ts"} <= set(items.columns)
    assert {"user_id", "age", "gender", "city"} <= set(users.columns)
    assert ev["ts"].between(SMALL.start_ts, SMALL.start_ts + SMALL.log_days * 86400 + 60).all()


def test_every_click_is_on_a_shown_item_of_its_request(tables):
    ev, _, _ = tables
    imp = ev[ev.event == "impression"].set_index(["request_id", "item_id"])
    clk = ev[ev.event == "click"].set_index(["request_id", "item_id"])
    assert clk.index.isin(imp.index).all()
    assert (clk["ts"].values > imp.loc[clk.index, "ts"].values).all()  # clicks come after the impression


def test_slates_have_distinct_items_and_positions(tables):
    ev, _, _ = tables
    imp = ev[ev.event == "impression"]
    assert not imp.duplicated(["request_id", "item_id"]).any()
    assert not imp.duplicated(["request_id", "position"]).any()
    assert imp["position"].between(0, SMALL.slate_size - 1).all()


def test_items_are_only_shown_after_release(tables):
    ev, items, _ = tables
    first = items.set_index("item_id")["first_seen_ts"]
    imp = ev[ev.event == "impression"]
    assert (imp["ts"].values >= first.loc[imp["item_id"]].values).all()
    assert (items["first_seen_ts"] > SMALL.start_ts).mean() == pytest.approx(SMALL.new_item_frac, abs=0.1)


def test_ctr_is_in_the_designed_range(tables):
    ev, _, _ = tables
    ctr = (ev.event == "click").sum() / (ev.event == "impression").sum()
    assert 0.03 < ctr < 0.2


def test_click_model_api_is_vectorised_and_bounded():
    w = get_world(SMALL)
    n = 50
    rng = np.random.default_rng(0)
    u = rng.integers(1, SMALL.num_users + 1, n)
    i = rng.integers(1, SMALL.num_items + 1, n)
    ts = np.full(n, w.ab_end_ts - 1)
    p = w.click_probabilities(u, i, np.zeros(n), ts)
    assert p.shape == (n,) and ((p >= 0) & (p <= 1)).all()
    # position bias: lower positions are clicked less, everything else equal
    p_low = w.click_probabilities(u, i, np.full(n, 9), ts)
    assert (p_low <= p).all() and (p_low < p).any()
    # unreleased items cannot be clicked
    early = np.full(n, SMALL.start_ts - 400 * 86400)
    assert (w.click_probabilities(u, i, np.zeros(n), early) == 0).all()
    with pytest.raises(KeyError):
        w.click_probabilities(np.array([SMALL.num_users + 1]), i[:1], [0], ts[:1])


def test_user_state_continues_into_the_ab_period():
    w = get_world(SMALL)
    u = np.zeros(6, dtype=np.int64)
    ts = w.log_end_ts + np.arange(6) * 3600
    a = w.short_term_category(u, ts)
    assert (a == get_world(SMALL).short_term_category(u, ts)).all()  # pure function of (user, t)
    # the dormant interest is active early and late (A/B), not in the middle
    mid = w.start_ts + (w.log_end_ts - w.start_ts) // 2
    assert w.dormant_active(np.array([w.start_ts, mid, w.log_end_ts + 10])).tolist() == [True, False, True]


def test_short_term_interest_is_sticky():
    w = get_world(SMALL)
    u = np.repeat(np.arange(50), 40)
    ts = np.tile(w.start_ts + np.arange(40) * SMALL.short_epoch_hours * 3600, 50)
    c = w.short_term_category(u, ts).reshape(50, 40)
    stay = (c[:, 1:] == c[:, :-1]).mean()
    assert 0.7 < stay < 0.97  # stay prob 0.8 plus jumps that land on the same category


def test_titles_carry_category_words():
    w = get_world(SMALL)
    items = w.items_table()
    vocab = {c: set(w.cat_vocab[k]) for k, c in enumerate(w.cat_names)}
    hits = [len(set(t.split()) & vocab[c]) >= 2 for t, c in zip(items["title"], items["category"], strict=True)]
    assert np.mean(hits) > 0.99


def test_hash_uniform_is_uniform_and_deterministic():
    a = np.arange(20000)
    r = hash_uniform(1, 2, a, a * 7)
    assert np.array_equal(r, hash_uniform(1, 2, a, a * 7))
    assert abs(r.mean() - 0.5) < 0.01 and r.min() >= 0 and r.max() < 1
