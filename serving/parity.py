"""The serving path over logged rows: what serving would have built for each logged (user, item, ts),
given the state as of ts — the harness of the train/serve parity check.

`replay_served_batch` starts the online state from a snapshot at `t0` (the ingest's own partials over
its user pass, as of t0) and replays the log after t0 through the updates a server applies
(`observe_exposures` as it logs slates, `observe_clicks` as /feedback hears clicks, `observe_activity`
for other events), in time order; at each logged request, before its own events, it builds the
request's rows with `FeatureStore.ranking_batch` — the call the ingress and the stages make. The
training path builds the same rows with `RankingBatcher` from the ingest's ranking table; the two
must be equal (tests/data/test_feature_parity.py, benchmarks/feature_skew.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.state import FeatureState, activity_rows, combine_state, logged_exposures, state_partials


def first_requests(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """The logged rows of the first requests (user, ts) in time order, about `n` rows in all."""
    rows = rows.sort_values(["ts", "user_key", "item_key"], kind="stable")
    req = rows.groupby(["ts", "user_key"], sort=True).ngroup().to_numpy()
    if len(rows) > n:
        rows = rows[req <= req[n - 1]]
    return rows


def replay_served_batch(root: str | Path, p1: pd.DataFrame, t0: int, rows: pd.DataFrame, strength: float,
                        long_len: int, short_len: int, seq_len: int, progress: bool = False
                        ) -> tuple[dict[str, torch.Tensor], object]:
    """The serving path's batch for logged `rows` (all at or after t0, sorted by (ts, user_key)), and the
    FeatureStore it used. `p1`: the ingest's user pass over every accepted event (`user_pass_local`)."""
    from serving.features import FeatureStore

    meta = {"version": 1, "as_of": int(t0), "ctr_prior_strength": strength, "long_len": long_len,
            "short_len": short_len}
    state = FeatureState.from_tables(root, combine_state([state_partials(p1, t0)]), meta)
    store = FeatureStore(root, state=state)
    uk, ik = p1["user_key"].to_numpy(np.int64), p1["item_key"].to_numpy(np.int64)
    ts, cts = p1["ts"].to_numpy(np.int64), p1["click_ts"].to_numpy(np.int64)
    exp = logged_exposures(p1) & (ts >= t0)
    clk = logged_exposures(p1) & (p1["label"].to_numpy() == 1) & (cts >= t0)
    act = activity_rows(p1) & (ts >= t0)
    streams = []  # (times, users, items, update), each time-ordered
    for t, m, fn in ((ts, exp, state.observe_exposures), (cts, clk, state.observe_clicks),
                     (ts, act, lambda u, _i, t: state.observe_activity(u, t))):
        o = np.argsort(t[m], kind="stable")
        streams.append((t[m][o], uk[m][o], ik[m][o], fn))
    done = [0] * len(streams)
    out = []
    groups = rows.groupby(["ts", "user_key"], sort=True)
    for (t, u), g in tqdm(groups, total=groups.ngroups, desc="replay", disable=not progress):
        for j, (st, su, si, fn) in enumerate(streams):  # every update strictly before t
            upto = int(np.searchsorted(st, t, side="left"))
            if upto > done[j]:
                fn(su[done[j]:upto], si[done[j]:upto], st[done[j]:upto])
                done[j] = upto
        hist, hist_ts = store.user_history_ts(int(u), ts=int(t))  # what the ingress's _user reads
        out.append(store.ranking_batch(int(u), hist, g["item_key"].to_numpy(), int(t),
                                       position=g["position"].to_numpy() - 1,  # the logged slot (feature = slot + 1)
                                       seq_len=seq_len, hist_ts=hist_ts))
    return {k: torch.cat([b[k] for b in out]) for k in out[0]}, store
