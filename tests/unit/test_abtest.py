"""A/B routing and analysis without Ray: sticky buckets, shares, lift CI coverage, SRM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from abtest.analysis import analyse, report_markdown
from serving.router import ArmRouter, EventLog, bucket, read_events


def test_buckets_are_sticky_and_arms_get_their_shares():
    r = ArmRouter({"a": 20, "b": 30, "c": 50}, salt="s1")
    users = [f"u{i}" for i in range(20_000)]
    arms = [r.arm(u) for u in users]
    assert arms == [r.arm(u) for u in users]  # sticky
    share = pd.Series(arms).value_counts(normalize=True)
    assert abs(share["a"] - 0.2) < 0.015 and abs(share["b"] - 0.3) < 0.015 and abs(share["c"] - 0.5) < 0.015
    other = ArmRouter({"a": 20, "b": 30, "c": 50}, salt="s2")
    assert np.mean([other.arm(u) != a for u, a in zip(users, arms, strict=True)]) > 0.4  # a new salt reshuffles
    assert 0 <= bucket("s", "x") < 100
    with pytest.raises(ValueError, match="summing to 100"):
        ArmRouter({"a": 50, "b": 40}, "s")


def _events(n_users, ctr, arm, rng, req=4, k=10):
    rows = []
    for u in range(n_users):
        for r in range(req):
            rid = f"{arm}-{u}-{r}"
            clicks = rng.random(k) < ctr
            rows += [{"user_id": f"{arm}{u}", "item_id": str(i), "ts": r, "event": "impression", "request_id": rid,
                      "position": i, "arm": arm} for i in range(k)]
            rows += [{"user_id": f"{arm}{u}", "item_id": str(i), "ts": r, "event": "click", "request_id": rid,
                      "position": i, "arm": arm} for i in np.flatnonzero(clicks)]
    return rows


def test_lift_ci_covers_the_truth_and_detects_a_real_lift():
    rng = np.random.default_rng(0)
    ev = pd.DataFrame(_events(800, 0.10, "control", rng) + _events(800, 0.12, "treatment", rng))
    res = analyse(ev, {"control": 50, "treatment": 50}, "control", "treatment")
    lift = res["lift"]
    assert lift["ci_low"] < 0.2 < lift["ci_high"] and lift["ci_low"] > 0  # truth +20%, significant
    assert res["significant_positive"] and not res["srm"]["mismatch"]
    assert res["arms"]["control"]["requests"] == 3200 and res["arms"]["treatment"]["impressions"] == 32_000
    assert "Lift of CTR" in report_markdown(res)


def test_null_ci_coverage_over_repeats():
    """Under no effect, the 95% CI holds 0 in about 95% of repeated tests."""
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(40):
        ev = pd.DataFrame(_events(150, 0.1, "control", rng, req=2) + _events(150, 0.1, "treatment", rng, req=2))
        lift = analyse(ev, {"control": 50, "treatment": 50}, "control", "treatment")["lift"]
        covered += lift["ci_low"] <= 0 <= lift["ci_high"]
    assert covered >= 34  # ≥ 85% of 40 (95% nominal, binomial slack)


def test_sample_ratio_mismatch_is_flagged():
    rng = np.random.default_rng(2)
    ev = pd.DataFrame(_events(400, 0.1, "control", rng, req=1) + _events(250, 0.1, "treatment", rng, req=1))
    res = analyse(ev, {"control": 50, "treatment": 50}, "control", "treatment")
    assert res["srm"]["mismatch"] and not res["significant_positive"]


def test_event_log_is_in_the_canonical_format(tmp_path):
    log = EventLog(tmp_path)
    log.exposures("u1", ["a", "b"], 100, "r1", "treatment", "funnel-karma/1,funnel-lrea/1,funnel-cdnet/2")
    log.click("u1", "b", 101, "r1", 1, "treatment", "funnel-karma/1,funnel-lrea/1,funnel-cdnet/2")
    log.flush()
    assert log.flush() is None
    ev = read_events(tmp_path)
    assert list(ev.columns) == ["user_id", "item_id", "ts", "event", "request_id", "position", "arm", "model_versions"]
    assert ev["event"].tolist() == ["impression", "impression", "click"] and ev["position"].tolist() == [0, 1, 1]
    assert set(ev["model_versions"]) == {"funnel-karma/1,funnel-lrea/1,funnel-cdnet/2"}


def test_the_versions_promoted_are_the_ones_the_exposures_record():
    """Each exposure names the versions that served it; one set throughout → that set, else none."""
    from abtest.analysis import served_versions

    a, b = "funnel-karma/1,funnel-lrea/1,funnel-cdnet/2", "funnel-karma/1,funnel-lrea/1,funnel-cdnet/3"
    ev = pd.DataFrame([{"event": "impression", "arm": "treatment", "model_versions": a},
                       {"event": "impression", "arm": "control", "model_versions": ""},
                       {"event": "click", "arm": "treatment", "model_versions": a}])
    assert served_versions(ev, "treatment") == {
        "treatment_version_sets": [a], "treatment_versions": {"funnel-karma": "1", "funnel-lrea": "1",
                                                              "funnel-cdnet": "2"}}
    moved = pd.concat([ev, pd.DataFrame([{"event": "impression", "arm": "treatment", "model_versions": b}])])
    assert served_versions(moved, "treatment") == {"treatment_version_sets": [a, b], "treatment_versions": {}}
    assert served_versions(ev.drop(columns="model_versions"), "treatment")["treatment_versions"] == {}


def test_served_requests_claim_each_position_once_and_forget_the_oldest():
    from serving.router import Served, ServedRequests

    reg = ServedRequests(max_requests=2)
    s1 = Served("u1", "treatment", ["a", "b", "c"], "v", 100)
    reg.add("r1", s1)
    assert reg.claim(s1, [0, 2, 0]) == [0, 2] and reg.claim(s1, [2, 1]) == [1]  # idempotent per position
    reg.add("r2", Served("u2", "control", ["x"], "", 100))
    reg.add("r3", Served("u3", "control", ["y"], "", 100))
    assert reg.get("r1") is None and reg.get("r3").user_id == "u3"  # bounded: the oldest is forgotten


def test_ab_schedule_is_sessions_inside_the_ab_horizon():
    from abtest.traffic import schedule
    from configs import WorldConfig
    from pipeline.world import get_world

    world = get_world(WorldConfig())
    rng = np.random.default_rng(0)
    gaps = []
    for n in (1, 2, 4, 9):
        t = schedule(world, n, rng)
        assert len(t) == n and np.all(np.diff(t) >= 0)
        assert t.min() >= world.log_end_ts and t.max() < world.ab_end_ts
        gaps += np.diff(t).tolist()
    gaps = np.array(gaps)
    assert (gaps < 3600).mean() > 0.4  # most follow-ups are in-session (seconds to minutes apart)
    assert gaps.max() > 3600  # and users come back in later sessions


def _hetero(n_users, lift, arm, rng, req=6, k=10):
    """Users with their own CTR (Beta-distributed); the treatment multiplies it by 1 + lift.
    Returns the events and each user's pre-test CTR as a noisy log would show it (200 impressions)."""
    base = rng.beta(2, 12, size=n_users)
    ctr = np.clip(base * (1 + lift), 0, 1)
    rows, pre = [], {}
    for u in range(n_users):
        uid = f"{arm}{u}"
        pre[uid] = rng.binomial(200, base[u]) / 200
        clicks = rng.random((req, k)) < ctr[u]
        for r in range(req):
            rid = f"{uid}-{r}"
            rows += [{"user_id": uid, "item_id": str(i), "ts": r, "event": "impression", "request_id": rid,
                      "position": i, "arm": arm} for i in range(k)]
            rows += [{"user_id": uid, "item_id": str(i), "ts": r, "event": "click", "request_id": rid,
                      "position": i, "arm": arm} for i in np.flatnonzero(clicks[r])]
    return rows, pre


def test_cuped_narrows_the_ci_around_the_same_lift():
    rng = np.random.default_rng(3)
    (c_rows, c_pre), (t_rows, t_pre) = _hetero(500, 0.0, "control", rng), _hetero(500, 0.10, "treatment", rng)
    ev, cov = pd.DataFrame(c_rows + t_rows), pd.Series(c_pre | t_pre)
    res = analyse(ev, {"control": 50, "treatment": 50}, "control", "treatment", covariate=cov)
    raw, cu = res["lift"], res["lift_cuped"]
    assert cu["variance_reduction"] > 0.3 and cu["theta"] > 0  # the pre-test CTR explains much of a user's CTR
    assert cu["ci_high"] - cu["ci_low"] < 0.85 * (raw["ci_high"] - raw["ci_low"])
    assert abs(cu["relative"] - raw["relative"]) < 0.05 and cu["ci_low"] < 0.10 < cu["ci_high"]
    assert res["decided_on"] == "lift_cuped" and res["significant_positive"] == (cu["ci_low"] > 0)
    assert "CUPED" in report_markdown(res)
    # decide on the raw lift when asked, or when no user has a covariate
    assert analyse(ev, {"control": 50, "treatment": 50}, "control", "treatment", covariate=cov,
                   decide_on_cuped=False)["decided_on"] == "lift"
    none = analyse(ev, {"control": 50, "treatment": 50}, "control", "treatment", covariate=pd.Series(dtype=float))
    assert none["lift_cuped"] is None and none["decided_on"] == "lift"


def test_cuped_null_ci_coverage_over_repeats():
    """No effect: the CUPED CI holds 0 in about 95% of repeated tests (it must not buy width with bias)."""
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(40):
        (c_rows, c_pre), (t_rows, t_pre) = _hetero(120, 0.0, "control", rng, req=2), _hetero(120, 0.0, "treatment",
                                                                                            rng, req=2)
        cu = analyse(pd.DataFrame(c_rows + t_rows), {"control": 50, "treatment": 50}, "control", "treatment",
                     covariate=pd.Series(c_pre | t_pre))["lift_cuped"]
        covered += cu["ci_low"] <= 0 <= cu["ci_high"]
    assert covered >= 34


def test_exposure_concentration_over_the_catalogue():
    from abtest.analysis import exposure_concentration

    cat = np.arange(1, 201)
    even = exposure_concentration(np.repeat(cat, 3), cat)
    assert even["gini"] == pytest.approx(0.0) and even["coverage"] == 1.0
    assert even["top1_share"] == pytest.approx(0.01)
    one = exposure_concentration(np.full(50, 7), cat)  # every exposure on one item: maximal
    assert one["gini"] == pytest.approx(1 - 1 / 200) and one["top1_share"] == 1.0 and one["coverage"] == 1 / 200
    half = exposure_concentration(np.arange(1, 101), cat)  # half the catalogue, once each
    assert half["gini"] == pytest.approx(0.5) and half["coverage"] == 0.5


def test_loop_horizons_follow_each_other_and_lifts_are_against_round_one():
    from abtest.rounds import table
    from configs import WorldConfig
    from jobs.loop import horizon
    from pipeline.world import get_world

    world = get_world(WorldConfig())
    h1, h2 = horizon(world, 1), horizon(world, 2)
    assert h1[0] == world.log_end_ts and h1[1] == world.ab_end_ts == h2[0] and h2[1] - h2[0] == h1[1] - h1[0]
    rounds = [{"round": r, "arms": {"control": {"ctr": 0.1, "true_ctr": 0.1}, "treatment": {"ctr": 0.1 * r, "true_ctr": 0.2}}}
              for r in (1, 2)]
    df = table(rounds).set_index(["round", "arm"])
    assert df.loc[(2, "treatment"), "ctr_vs_round1"] == pytest.approx(1.0)
    assert df.loc[(2, "control"), "ctr_vs_round1"] == pytest.approx(0.0)


def test_the_loop_summary_reads_the_arms_the_ab_named():
    """The true-CTR lift of a round is treatment over control as the A/B named them (config arm names)."""
    from abtest.rounds import round_summary

    rounds = [{"round": 1, "control": "pop", "treatment": "new", "promote": {"promoted": True},
               "lift": {"relative": 0.1, "ci_low": 0.0, "ci_high": 0.2, "p_value": 0.04},
               "arms": {"pop": {"true_ctr": 0.1}, "new": {"true_ctr": 0.12}}}]
    row = round_summary(rounds).iloc[0]
    assert row["true_ctr_lift"] == pytest.approx(0.2) and row["ab_lift"] == 0.1 and row["promoted"]


def test_the_challenger_is_decided_against_the_champion_when_an_arm_serves_it():
    """Promotion moves `challenger` to `champion`: with an arm on funnel@champion, the decisive lift
    is the challenger's over it (a challenger better than popularity but worse than the champion must
    not be promoted); popularity stays in the report as the floor."""
    from abtest.analysis import compare_arms, decision_arms

    two = {"control": "popularity", "treatment": "funnel@challenger"}
    three = {"control": "popularity", "champion": "funnel@champion", "treatment": "funnel@challenger"}
    assert decision_arms(two) == ("control", "treatment", "control")
    assert decision_arms(three) == ("champion", "treatment", "control")
    rng = np.random.default_rng(0)
    ev = pd.DataFrame(_events(600, 0.08, "control", rng) + _events(600, 0.12, "champion", rng)
                      + _events(1200, 0.11, "treatment", rng))
    res = compare_arms(ev, {"control": 25, "champion": 25, "treatment": 50}, three)
    assert (res["control"], res["treatment"]) == ("champion", "treatment")
    assert res["lift"]["relative"] < 0 and not res["significant_positive"]  # worse than the champion
    floor = res["vs_popularity"]
    assert floor["control"] == "control" and floor["lift"]["ci_low"] > 0  # yet better than popularity
    md = report_markdown(res)
    assert "treatment vs champion" in md and "treatment vs control (popularity)" in md


def test_the_champion_arm_takes_half_the_popularity_buckets_and_the_treatment_keeps_its_users():
    from abtest.promotion import champion_arms
    from abtest.rounds import round_summary
    from configs.schema import ABTestConfig

    ab = ABTestConfig()
    three = champion_arms(ab)
    assert three.arms == {"control": 25, "champion": 25, "treatment": 50}
    assert three.variants["champion"] == "funnel@champion" and champion_arms(three) is three
    users = [f"u{i}" for i in range(5_000)]
    before, after = ArmRouter(ab.arms, ab.salt), ArmRouter(three.arms, three.salt)
    for u in users:
        a, b = before.arm(u), after.arm(u)
        assert (a == "treatment") == (b == "treatment")  # the challenger's users stay its users
        assert a == "control" or b == a
    rounds = [{"round": 2, "control": "champion", "treatment": "treatment", "popularity_arm": "control",
               "promote": {"promoted": False}, "lift": {"relative": -0.05},
               "arms": {"control": {"true_ctr": 0.1}, "champion": {"true_ctr": 0.125}, "treatment": {"true_ctr": 0.12}}}]
    row = round_summary(rounds).iloc[0]
    assert row["versus"] == "champion" and row["true_ctr_lift"] == pytest.approx(0.12 / 0.125 - 1)
    assert row["true_ctr_vs_popularity"] == pytest.approx(0.2)
