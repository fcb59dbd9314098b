"""Data tests on the tiny world through the real Ray Data pipeline."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.history import HistoryStore
from pipeline.ingest import run_ingest, run_ingest_local
from pipeline.outputs import read_rejects
from pipeline.readers import RawTables
from pipeline.simulator import simulate_local
from tests.conftest import ROOT

pytestmark = pytest.mark.ray

# Bad rows of every class, injected into the tiny world's log: (row, reason, copies).
BAD = {
    "missing_user_id": dict(user_id=None),
    "missing_item_id": dict(item_id=""),
    "unparsable_timestamp": dict(ts="yesterday at noon"),
    "negative_timestamp": dict(ts="-5"),
    "timestamp_out_of_range": dict(ts="9999999999"),
    "unknown_event_kind": dict(event="hover"),
    "item_without_metadata": dict(item_id="999999"),
}


def _cfg(tiny_cfg, out: Path, **data):
    return dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, output=str(out), **data))


@pytest.fixture(scope="module")
def injected(tiny_cfg):
    ev, items, users = simulate_local(tiny_cfg.world)
    ev = ev.astype(str)  # as a CSV would deliver it: parsing is the pipeline's job
    good = ev.iloc[:1].to_dict("records")[0]
    bad = []
    for reason, change in BAD.items():
        for k in range(3):
            bad.append({**good, **change, "request_id": f"9{k}"})
    dups = ev.iloc[10:14]  # four valid rows, each logged twice more -> 8 duplicates
    events = pd.concat([ev, pd.DataFrame(bad), dups, dups], ignore_index=True)
    items_bad = pd.concat([items, items.iloc[:2], pd.DataFrame([{**items.iloc[0].to_dict(), "item_id": None}])],
                          ignore_index=True)
    return events, items_bad, users


@pytest.fixture(scope="module")
def ray_out(ray_session, injected, tiny_cfg, tmp_path_factory):
    events, items, users = injected
    out = tmp_path_factory.mktemp("ray_out")
    raw = RawTables(ray_session.data.from_pandas([events.iloc[k::4] for k in range(4)]), items, users, True, "simulator")
    stats = run_ingest(_cfg(tiny_cfg, out), raw)
    return out, stats


@pytest.fixture(scope="module")
def local_out(injected, tiny_cfg, tmp_path_factory):
    events, items, users = injected
    out = tmp_path_factory.mktemp("local_out")
    stats = run_ingest_local(_cfg(tiny_cfg, out), events, RawTables(None, items, users, True, "simulator"))
    return out, stats


def test_rejects_accounting_is_exact(ray_out, injected):
    out, stats = ray_out
    events, _, _ = injected
    assert stats["input_rows"]["events"] == len(events)
    assert stats["accepted_events"] + stats["rejected_events"] == len(events)
    want = {reason: 3 for reason in BAD} | {"duplicate_event": 8}
    assert stats["rejects_by_reason"] == want
    rej = read_rejects(out)
    ev_rej = rej[rej["table"] == "events"]
    assert ev_rej["reason"].value_counts().to_dict() == want
    assert (ev_rej.loc[ev_rej.reason == "unparsable_timestamp", "ts"] == "yesterday at noon").all()  # raw value kept
    assert stats["catalog_rejects"] == {"duplicate_item_id": 2, "missing_item_id": 1}
    assert (rej["table"] == "items").sum() == 3


def test_ray_and_single_process_agree(ray_out, local_out):
    (ro, rs), (lo, ls) = ray_out, local_out
    assert rs["fingerprint"] == ls["fingerprint"]
    assert rs["rejects_by_reason"] == ls["rejects_by_reason"]
    key = ["ts", "user_key", "item_key", "request_id"]
    a = pd.read_parquet(ro / "ranking").sort_values(key).reset_index(drop=True)
    b = pd.read_parquet(lo / "ranking").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b[a.columns], check_dtype=False, check_categorical=False)


def test_schema_matches_feature_spec(ray_out):
    out, stats = ray_out
    spec = json.loads((out / "feature_spec.json").read_text())
    assert spec["fingerprint"] == stats["fingerprint"]
    df = pd.read_parquet(out / "ranking")
    for name, f in spec["categorical"].items():
        assert name in df, name
        assert df[name].min() >= 0 and df[name].max() < f["vocab_size"], name
    for name in spec["numeric"]:
        assert name in df and np.isfinite(df[name]).all(), name
    assert set(df["split"].astype(str)) == {"train", "val", "test"}
    assert df["label"].isin([0, 1]).all()
    assert (df["seq_len_long"] <= spec["sequences"]["long_len"]).all()
    assert (df["seq_len_short"] == np.minimum(df["seq_len_long"], spec["sequences"]["short_len"])).all()
    for s, v in stats["splits"].items():
        assert 0.02 < v["positive_rate"] < 0.25, s


def test_splits_are_by_time(ray_out):
    out, stats = ray_out
    df = pd.read_parquet(out / "ranking")
    t = stats["split_times"]
    split = df["split"].astype(str)
    assert (df.loc[split == "train", "ts"] < t["val_start"]).all()
    assert df.loc[split == "val", "ts"].between(t["val_start"], t["test_start"] - 1).all()
    assert (df.loc[split == "test", "ts"] >= t["test_start"]).all()


def test_vocab_is_built_from_train_only(ray_out):
    out, _ = ray_out
    df = pd.read_parquet(out / "ranking")
    items = pd.read_parquet(out / "items.parquet")
    train_items = set(df.loc[df["split"].astype(str) == "train", "item_key"])
    oov = items.loc[~items["item_key"].isin(train_items), "item_idx"]
    assert (oov == 1).all()  # never seen in train -> OOV, even if seen later


def test_gathered_histories_are_strictly_past(ray_out):
    out, _ = ray_out
    df = pd.read_parquet(out / "ranking")
    hs = HistoryStore.load(out)
    g = hs.gather(df["user_key"].to_numpy(), df["hist_end"].to_numpy(), 50)
    filled = g["item_key"] > 0
    assert filled.any()
    assert (np.where(filled, g["click_ts"], -1) < df["ts"].to_numpy()[:, None]).all()
    assert (filled.sum(1) == df["seq_len_long"].to_numpy()).all()


def test_retrieval_hard_negatives_come_from_the_same_request(ray_out):
    out, _ = ray_out
    rk = pd.read_parquet(out / "ranking")
    rt = pd.read_parquet(out / "retrieval")
    assert len(rt) == int(rk["label"].sum())
    shown = rk[rk["label"] == 0].groupby(["user_key", "request_id"])["item_key"].apply(set)
    for r in rt.head(200).itertuples():
        negs = {int(x) for x in r.hard_negs if x > 0}
        assert negs <= shown.get((r.user_key, r.request_id), set())
        assert len(negs) == r.n_hard
    assert (rt["n_hard"] > 0).mean() > 0.5
    assert len(rt["target_title"].iloc[0]) == 12


def test_clicks_only_log_samples_negatives_never_clicked(ray_session, tiny_cfg, tmp_path):
    ev, items, users = simulate_local(tiny_cfg.world)
    clicks = ev[ev.event == "click"].assign(request_id=-1, position=-1)
    csv = tmp_path / "UserBehavior.csv"
    cat = items.set_index("item_id")["category"]
    pd.DataFrame({"u": clicks.user_id, "i": clicks.item_id, "c": cat.loc[clicks.item_id].to_numpy(),
                  "b": "pv", "t": clicks.ts}).to_csv(csv, header=False, index=False)
    from pipeline.readers import read_taobao

    raw = read_taobao(csv)
    assert not raw.has_impressions
    stats = run_ingest(_cfg(tiny_cfg, tmp_path / "out", num_negatives=3), raw)
    assert stats["input_rows"]["events"] == len(clicks)
    assert stats["accepted_events"] + stats["rejected_events"] == len(clicks)
    assert set(stats["rejects_by_reason"]) <= {"duplicate_event"}  # clicks logged twice in one second
    df = pd.read_parquet(tmp_path / "out" / "ranking")
    neg = df[df["is_sampled_negative"] == 1]
    pos = df[df["label"] == 1]
    assert len(neg) > 2.5 * len(pos)
    m = neg.merge(pos[["user_key", "item_key", "ts"]].rename(columns={"ts": "pos_ts"}), on=["user_key", "item_key"])
    assert not (m["pos_ts"] <= m["ts"]).any()  # never an item the user had clicked by then


MOVIELENS = ROOT / "data" / "raw" / "ml-100k" / "ml-100k.inter"


@pytest.mark.skipif(not MOVIELENS.exists(), reason="MovieLens-100k not fetched (make movielens)")
def test_movielens_100k_accounts_for_every_rating(ray_session, tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path / "ml", source="movielens", input=str(MOVIELENS.parent))
    stats = run_ingest(cfg)
    assert stats["input_rows"]["events"] == 100_000
    assert stats["accepted_events"] + stats["rejected_events"] == 100_000
    for s in ("train", "val", "test"):
        assert stats["splits"][s]["ranking_rows"] > 0
    assert 0.4 < stats["splits"]["train"]["positive_rate"] < 0.7  # ratings >= 4 are clicks
    assert stats["users"] == 943


def test_ingest_cli_help():
    r = subprocess.run([sys.executable, "-m", "jobs.ingest", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--source" in r.stdout and "movielens" in r.stdout


def test_served_events_reingest_with_exact_accounting(ray_session, tiny_cfg, tmp_path):
    """The served log (serving.router.EventLog's segments) goes back in beside the source's events:
    every served row is counted, accepted or rejected with its reason, and the accepted ones
    become examples."""
    from pipeline.readers import read_generic, with_served_events
    from serving.router import EventLog

    ev, items, users = simulate_local(tiny_cfg.world)
    t_end = int(ev["ts"].max())
    log_dir = tmp_path / "served"
    log = EventLog(log_dir, max_rows=50, max_age_s=3600)  # several segments
    rng = np.random.default_rng(0)
    shown = 0
    for r in range(40):
        u = str(users["user_id"].iloc[r % len(users)])
        slate = [str(i) for i in rng.choice(items["item_id"].to_numpy(), 5, replace=False)]
        log.exposures(u, slate, t_end + 60 * (r + 1), f"req{r:04d}", "treatment", "funnel-cdnet/1")
        log.click(u, slate[r % 5], t_end + 60 * (r + 1) + 5, f"req{r:04d}", r % 5, "treatment")
        shown += 6
    log.exposures(str(users["user_id"].iloc[0]), ["no-such-item"], t_end + 3000, "reqbad", "control")
    log.close()
    assert len(list(log_dir.glob("events-*.parquet"))) >= 4

    out = tmp_path / "out"
    raw = RawTables(ray_session.data.from_pandas([ev.iloc[k::2] for k in range(2)]), items, users, True, "simulator")
    stats = run_ingest(_cfg(tiny_cfg, out, max_ts=t_end + 10 * 86_400), with_served_events(raw, [str(log_dir)]))
    assert stats["input_rows"]["served_events"] == shown + 1
    assert stats["input_rows"]["events"] == len(ev) + shown + 1
    assert stats["accepted_events"] + stats["rejected_events"] == len(ev) + shown + 1
    assert stats["rejects_by_reason"] == {"item_without_metadata": 1}
    rank = pd.read_parquet(out / "ranking", columns=["ts", "label"])
    served_rows = rank[rank["ts"] > t_end]
    assert len(served_rows) == 40 * 5 and int(served_rows["label"].sum()) == 40  # each click pairs with its impression

    alone = read_generic(log_dir, {})  # the event log read as a source of its own
    assert alone.source == "parquet" and len(alone.events.to_pandas()) == shown + 1
