"""One feature path: a served row equals the training row for the same (user, item, ts).

The tiny world is ingested (the training path: ranking/ rows → RankingBatcher). The online state is
started from a snapshot at the start of the test split, built by the ingest's own partials, and the
rest of the log is replayed through the online updates a server applies (exposures as it logs them,
clicks as /feedback hears them), in time order. At each logged test request, before its own events,
the serving path (serving.features.FeatureStore, as the ingress and the stages call it; the replay is
serving/parity.py) builds the request's rows; they must equal the training tensors: ids exactly, floats within 1e-6. Then every
registered ranking model scores both; the two AUCs must be equal (the train/serve skew per model).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from models.spec import FeatureSpec
from pipeline.ingest import user_pass_local
from pipeline.readers import RawTables
from pipeline.simulator import simulate_local
from pipeline.state import FeatureState
from serving.features import FeatureStore
from serving.parity import first_requests, replay_served_batch
from training.batches import RankingBatcher

ROWS = 3000


@pytest.fixture(scope="module")
def replay(tiny_cfg, tiny_processed):
    """(training batch, serving batch, rows) for the first ~ROWS test rows, in time order."""
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, output=str(tiny_processed)))
    ev, items, users = simulate_local(cfg.world)
    up = user_pass_local(cfg, ev, RawTables(None, items, users, True, "simulator"))
    test = first_requests(pd.read_parquet(tiny_processed / "ranking" / "split=test"), ROWS)
    assert len(test) >= ROWS
    d = cfg.data
    seq_len = FeatureSpec.from_json(tiny_processed / "feature_spec.json").seq_len
    serving, store = replay_served_batch(tiny_processed, up.p1, up.t_test, test, d.ctr_prior_strength, d.long_len,
                                         d.short_len, seq_len)
    training = RankingBatcher(store.spec, store.history, seq_len)({c: test[c].to_numpy() for c in test.columns})
    return training, serving, test, store


def test_served_rows_equal_training_rows(replay):
    training, serving, test, _ = replay
    spec_fields = [k for k in training if k not in ("label",)]
    assert set(spec_fields) <= set(serving), set(spec_fields) - set(serving)
    bad = {}
    for k in spec_fields:
        a, b = training[k], serving[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        same = (a == b) if not a.is_floating_point() else torch.isclose(a, b, rtol=0, atol=1e-6)
        if not bool(same.all()):
            rows = torch.nonzero(~same.reshape(len(a), -1).all(1)).flatten()[:3]
            bad[k] = (int((~same.reshape(len(a), -1).all(1)).sum()), a[rows].tolist(), b[rows].tolist())
    assert not bad, f"{len(test)} rows; mismatching fields (rows, training, serving): {bad}"


def test_online_updates_moved_the_counters(replay):
    """Not a vacuous replay: the rows read clicks and exposures the snapshot did not have."""
    training, serving, _, store = replay
    c = store.state.counters()
    assert c["online_clicks"] > 100 and c["users_with_online_clicks"] > 20, c
    assert int(serving["hist_len"].max()) > 0 and float(training["item_clicks_before"].max()) > 0


def _ranking_models() -> list[str]:
    from models.registry import RANKING

    return [*RANKING, "adaf2m2:dcnv2"]


@pytest.mark.parametrize("name", _ranking_models())
def test_train_serve_skew_per_model_is_zero(replay, tiny_processed, name):
    """Each ranking model scores the training rows and the served rows: the same logits, the same AUC."""
    from models import build_model
    from training.metrics import auc

    training, serving, test, _ = replay
    torch.manual_seed(0)
    model = build_model(name, FeatureSpec.from_json(tiny_processed / "feature_spec.json"), tiny=True).eval()
    with torch.inference_mode():
        a = torch.sigmoid(model(training).logits.float()).numpy()
        b = torch.sigmoid(model(serving).logits.float()).numpy()
    y = test["label"].to_numpy()
    assert np.allclose(a, b, rtol=0, atol=1e-6), float(np.abs(a - b).max())
    assert auc(y, a) == auc(y, b)


def test_a_user_born_online_accumulates_state_and_unknown_items_do_not(tiny_processed):
    state = FeatureState.load(tiny_processed)
    store = FeatureStore(tiny_processed, state=state)
    assert store.user_key("nobody-yet") == 0  # a read never creates a user
    u = store.user_key("nobody-yet", create=True)
    assert u >= state.n_users and store.user_key("nobody-yet") == u
    t = state.as_of + 3600
    store.observe_exposures(u, np.array([1, 2, 0]), t)
    clicks_on_2 = int(state.item_clicks[2])
    store.observe_clicks(u, np.array([2, 0]), t + 5)  # item 0 (unknown) is not a click
    assert state.item_clicks[0] == 0 and state.item_clicks[2] == clicks_on_2 + 1
    view = state.user_view(u, t + 10, 50)
    assert view.counters["user_exposures_before"] == 3 and view.counters["user_clicks_before"] == 1
    assert view.history.tolist() == [2] and view.history_ts.tolist() == [t + 5]
    assert view.counters["user_active_days_7"] == 1 and state.user_view(u, t + 5, 50).counters["user_clicks_before"] == 0
    assert state.user_view(u, t + 31 * 86_400, 50).counters["user_active_days_30"] == 0  # the window moved past
    rows = state.user_rows(u, np.array([2, 10**9]), t + 10)
    assert rows["user_idx"].tolist() == [1, 1] and rows["item_idx"][1] == 1  # OOV ids, never padding
    assert rows["item_age_days"][1] == -1.0  # an unknown item's release is unknown


def test_online_activity_keeps_each_user_day_s_first_and_last_event(tiny_processed):
    """`FeatureState._activity` (one sort, no group-by) against a pandas group-by of the same events."""
    state = FeatureState.load(tiny_processed)
    rng = np.random.default_rng(3)
    users = rng.choice(np.arange(1, min(state.n_users, 40)), 6, replace=False)
    uk = rng.choice(users, 300)
    ts = state.as_of + rng.integers(0, 5 * 86_400, 300)
    base = {int(u): {int(r[0]): [int(r[1]), int(r[2])] for r in state._base_activity(int(u))} for u in users}
    state.observe_activity(uk[:150], ts[:150])
    state.observe_activity(uk[150:], ts[150:])  # a second batch merges with the first
    want = pd.DataFrame({"u": uk, "d": ts // 86_400, "t": ts}).groupby(["u", "d"])["t"].agg(["min", "max"])
    for (u, d), (lo, hi) in zip(want.index.tolist(), want.to_numpy().tolist(), strict=True):
        old = base[u].get(d)
        assert state._act_online[u][d] == ([lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)])
    assert sorted(state._act_online) == sorted(int(u) for u in users)


def test_active_days_count_the_window_s_edges_by_event_time():
    from pipeline.state import _active_days

    day = 86_400
    act = np.array([[10, 10 * day + 100, 10 * day + 200], [17, 17 * day + 50, 17 * day + 500]])
    ts = 17 * day + 150  # window [10d+150, 17d+150): day 10's last event (200) is in, day 17's first (50) too
    assert _active_days(act, ts, 7 * day) == 2
    assert _active_days(act, 17 * day + 40, 7 * day) == 1  # day 17's first event is not before ts yet
    assert _active_days(act, 17 * day + 300, 7 * day) == 1  # day 10's events are now before the window
