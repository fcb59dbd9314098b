"""The "replicated" online state (serving/state_store.py) on the real local Ray cluster and the tiny
world's real ingest output: two replicas' copies, each written to, converge to the state one process
holds after all the writes, and a user born online gets one key whichever replica saw them first."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def _state(root):
    from pipeline.state import FeatureState

    return FeatureState.load(root)


def test_two_copies_converge_to_the_state_of_one_process(ray_session, tiny_processed):
    from serving.state_store import replicated_state, shutdown

    name = "test-replicated-state"
    a, served = replicated_state(str(tiny_processed), name, 100, sync_s=3600.0, max_events=1000)  # synced by hand
    b, _ = replicated_state(str(tiny_processed), name, 100, sync_s=3600.0, max_events=1000)
    one = _state(tiny_processed)
    try:
        t = 1_702_000_000
        newcomer_a = a.online_key("born-online", create=True)
        assert newcomer_a > 0 and b.online_key("born-online") == 0  # b has not synced yet
        assert b.online_key("born-online", create=True) == newcomer_a  # one key, from the actor
        one.adopt_online_key("born-online", newcomer_a)
        writes = [(a, "exposures", 3, np.array([1, 2, 5]), t), (b, "exposures", 4, np.array([2, 7]), t + 1),
                  (b, "clicks", 3, np.array([2]), t + 2), (a, "clicks", 4, np.array([7]), t + 3),
                  (a, "exposures", newcomer_a, np.array([9]), t + 4), (b, "clicks", newcomer_a, np.array([9]), t + 5),
                  (b, "exposures", 3, np.array([1]), t + 6 - 86_400 * 3)]  # an older event: order must not matter
        for copy, kind, u, items, ts in writes:
            getattr(copy, f"observe_{kind}")(u, items, ts)
            getattr(one, f"observe_{kind}")(u, items, ts)
        # before a sync, each copy holds its own writes only
        assert a.counters()["exposures"] == one.counters()["exposures"] - 3
        # each applies the others' writes once (a also the actor's record of the key it asked for)
        assert a.sync() == 1 and b.sync() == 4 and a.sync() == 4
        assert a.sync() == 0 and b.sync() == 0
        ts = t + 10
        for copy in (a, b):
            assert copy.local.counters() == one.counters()
            for u in (3, 4, newcomer_a):
                va, vo = copy.user_view(u, ts, 50), one.user_view(u, ts, 50)
                np.testing.assert_array_equal(va.history, vo.history)
                np.testing.assert_array_equal(va.history_ts, vo.history_ts)
                assert va.counters == vo.counters
                ra, ro = copy.user_rows(u, np.arange(1, 12), ts), one.user_rows(u, np.arange(1, 12), ts)
                assert ra.keys() == ro.keys()
                for k in ro:
                    np.testing.assert_array_equal(ra[k], ro[k], err_msg=k)
        assert a.counters()["lost_events"] == 0 and a.counters()["sync_failures"] == 0
        # a replica that starts later replays the log
        c, _ = replicated_state(str(tiny_processed), name, 100, sync_s=3600.0, max_events=1000)
        assert c.local.counters() == one.counters() and c.online_key("born-online") == newcomer_a
        # the shared registry: registered without waiting, found by the others
        from serving.router import Served

        served.add("rid-1", Served("u", "treatment", ["i1", "i2"], "", t))
        assert served.get("rid-1").items == ["i1", "i2"] and served.claim_id("rid-1", [1, 1, 0]) == [1, 0]
    finally:
        for copy in (a, b):
            copy.close()
        assert shutdown(name)


def test_a_replica_past_the_log_s_window_reports_the_writes_it_lost(ray_session, tiny_processed):
    from serving.state_store import replicated_state, shutdown

    name = "test-replicated-window"
    a, _ = replicated_state(str(tiny_processed), name, 100, sync_s=3600.0, max_events=2)
    try:
        for i in range(5):
            a.observe_exposures(3, np.array([1]), 1_702_000_000 + i)
        a.sync()
        late, _ = replicated_state(str(tiny_processed), name, 100, sync_s=3600.0, max_events=2)
        assert late.counters()["lost_events"] == 3  # 5 writes, the log keeps 2: said, not hidden
        assert late.local.counters()["exposures"] == _state(tiny_processed).counters()["exposures"] + 2
    finally:
        a.close()
        shutdown(name)


def test_a_replica_s_store_reads_the_click_timelines_its_state_copy_loaded(ray_session, tiny_processed):
    """One HistoryStore per replica: the FeatureStore built over a replicated copy uses the copy's
    logged timelines instead of loading them a second time."""
    from serving.features import FeatureStore
    from serving.state_store import replicated_state, shutdown

    name = "test-replicated-history"
    a, _ = replicated_state(str(tiny_processed), name, 100, sync_s=3600.0, max_events=10)
    try:
        store = FeatureStore(tiny_processed, state=a)
        assert store.history is a.local.history
        u = int(np.nonzero(store.n_clicks > 0)[0][0])
        np.testing.assert_array_equal(store.user_history(u), FeatureStore(tiny_processed).user_history(u))
    finally:
        a.close()
        shutdown(name)
