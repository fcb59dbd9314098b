"""Online feature state: the counters, activity, CTR prior and click timelines a ranking row reads,
as a compact snapshot the ingest writes and serving keeps moving with the traffic.

The ingest computes the snapshot from its user pass (`state_partials` per block, `combine_state` on
the driver) as of the end of the log, and writes it under `state/` — catalogue-sized, never the
ranking table. Serving loads it (`FeatureState.load`) and applies what it serves and hears:
`observe_exposures` for every slate it logs, `observe_clicks` for every /feedback click. Rows are
then built with the same feature definition as the ingest's (`pipeline.features.ranking_features`),
so a served row for (user, item, ts) equals the training row for it, given the state as of ts
(tests/data/test_feature_parity.py replays a log through the online updates to check it).

"As of ts" means: the events the state has observed with a time strictly before ts, as the ingest
counts them (pipeline/examples.py). Exposure counters count what was observed (the stream is
assumed in time order, as a server sees it); histories and activity carry times and are cut at ts
exactly. An unknown item (key 0) is never updated. A user the log does not have reads as a newcomer
(zero counters, no history, OOV ids: the state of a user's first rows in training) until the
server writes about them: `online_key(user_id, create=True)` gives them a key of their own past the
catalogue's (at most MAX_ONLINE_USERS), so their clicks and exposures accumulate like anyone's.

Shared by several replicas: `serving.state_store.StateActor` holds one `FeatureState` in a Ray actor;
or each replica holds a copy and the copies exchange their writes (`serving.state_store.ReplicatedState`):
every write is commutative (counters add, clicks insert in time order, activity keeps a day's first and
last event), so copies that have applied the same writes in any order hold the same state.
"""

from __future__ import annotations

import bisect
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.examples import daily_counts, examples_mask, numpy_frame, prior_from_totals
from pipeline.features import DAY, ranking_features

STATE_VERSION = 1
MAX_ONLINE_USERS = 1_000_000  # users born online the state keeps (beyond: they stay newcomers)
ACTIVITY_DAYS = 31  # the longest activity window (30 days) plus the partial day at its start
WINDOWS = {"user_active_days_7": 7 * DAY, "user_active_days_30": 30 * DAY}


# --------------------------------------------------------------------------- from the ingest


def logged_exposures(df: pd.DataFrame) -> np.ndarray:
    """The user pass's rows that the counters count as exposures: examples (exposures, duplicates
    dropped) that were logged, not sampled."""
    return examples_mask(df) & (np.asarray(df["event"].to_numpy(), dtype=object) != "sampled_negative")


def activity_rows(df: pd.DataFrame) -> np.ndarray:
    """Rows that make a user active on their day: every logged event, duplicates dropped."""
    return ~df["dup"].to_numpy().astype(bool) & (np.asarray(df["event"].to_numpy(), dtype=object) != "sampled_negative")


STATE_COLUMNS = ["user_key", "item_key", "ts", "click_ts", "label", "event", "dup", "is_exposure"]


def state_partials(df: pd.DataFrame, as_of: int) -> dict[str, pd.DataFrame]:
    """One block of the user pass → the state's partial counts of its events before `as_of`:
    exposures per user and per item, clicks per item, each user's active days in the last
    ACTIVITY_DAYS (first and last event time of the day), and the daily totals of the CTR prior."""
    df = numpy_frame(df)
    uk, ik = df["user_key"].to_numpy().astype(np.int64), df["item_key"].to_numpy().astype(np.int64)
    ts, cts = df["ts"].to_numpy().astype(np.int64), df["click_ts"].to_numpy().astype(np.int64)
    exp = logged_exposures(df) & (ts < as_of)
    clk = logged_exposures(df) & (df["label"].to_numpy() == 1) & (cts < as_of)
    act = activity_rows(df) & (ts < as_of) & (ts >= (as_of // DAY - ACTIVITY_DAYS + 1) * DAY)
    a = pd.DataFrame({"user_key": uk[act], "day": ts[act] // DAY, "first_ts": ts[act], "last_ts": ts[act]})
    return {
        "users": pd.DataFrame({"user_key": uk[exp], "exposures": 1}).groupby("user_key", as_index=False).sum(),
        "items": pd.concat([pd.DataFrame({"item_key": ik[exp], "exposures": 1, "clicks": 0}),
                            pd.DataFrame({"item_key": ik[clk], "exposures": 0, "clicks": 1})]
                           ).groupby("item_key", as_index=False).sum(),
        "activity": a.groupby(["user_key", "day"], as_index=False).agg(first_ts=("first_ts", "min"),
                                                                       last_ts=("last_ts", "max")),
        "daily": daily_counts(df[examples_mask(df)], as_of),
    }


def combine_state(parts: list[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """The partials of all blocks summed (the activity's first/last times min/max-ed): the snapshot tables."""
    def cat(name: str) -> pd.DataFrame:
        return pd.concat([p[name] for p in parts], ignore_index=True)

    return {
        "users": cat("users").groupby("user_key", as_index=False).sum().sort_values("user_key"),
        "items": cat("items").groupby("item_key", as_index=False).sum().sort_values("item_key"),
        "activity": cat("activity").groupby(["user_key", "day"], as_index=False).agg(
            first_ts=("first_ts", "min"), last_ts=("last_ts", "max")).sort_values(["user_key", "day"]),
        "daily": cat("daily").groupby("day", as_index=False).sum().sort_values("day"),
    }


def write_state(out: Path, tables: dict[str, pd.DataFrame], as_of: int, strength: float, long_len: int,
                short_len: int) -> None:
    folder = Path(out) / "state"
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        t.reset_index(drop=True).to_parquet(folder / f"{name}.parquet", index=False)
    (folder / "meta.json").write_text(json.dumps(
        {"version": STATE_VERSION, "as_of": int(as_of), "ctr_prior_strength": float(strength),
         "long_len": int(long_len), "short_len": int(short_len)}, indent=2) + "\n")


# --------------------------------------------------------------------------- the state


class DailyTotals:
    """Logged exposures (by their day) and clicks (by their click's day) per UTC day; `prior_at(ts)` is
    `pipeline.examples.PastPrior.at(ts)`: the CTR of everything before the start of ts's day."""

    def __init__(self, daily: pd.DataFrame):
        self.day0 = int(daily["day"].min()) if len(daily) else 0
        n = int(daily["day"].max()) - self.day0 + 1 if len(daily) else 1
        self.exposures, self.clicks = np.zeros(n, np.int64), np.zeros(n, np.int64)
        if len(daily):
            d = daily["day"].to_numpy(np.int64) - self.day0
            np.add.at(self.exposures, d, daily["exposures"].to_numpy(np.int64))
            np.add.at(self.clicks, d, daily["clicks"].to_numpy(np.int64))

    def add(self, ts: np.ndarray, exposures: int | np.ndarray, clicks: int | np.ndarray) -> None:
        d = np.asarray(ts, dtype=np.int64) // DAY - self.day0
        if len(d) and d.min() < 0:  # before the first day: shift the origin
            shift = int(-d.min())
            self.exposures, self.clicks = (np.r_[np.zeros(shift, np.int64), a] for a in (self.exposures, self.clicks))
            self.day0 -= shift
            d = d + shift
        if len(d) and d.max() >= len(self.exposures):
            grow = int(d.max()) + 1 - len(self.exposures)
            self.exposures, self.clicks = (np.r_[a, np.zeros(grow, np.int64)] for a in (self.exposures, self.clicks))
        np.add.at(self.exposures, d, exposures)
        np.add.at(self.clicks, d, clicks)

    def prior_at(self, ts: np.ndarray) -> np.ndarray:
        upto = np.clip(np.asarray(ts, dtype=np.int64) // DAY - self.day0, 0, len(self.exposures))
        return prior_from_totals(np.r_[0, np.cumsum(self.exposures)][upto], np.r_[0, np.cumsum(self.clicks)][upto])


@dataclass
class UserView:
    """One user's side of a request at ts: the history (item keys and click times, most recent last,
    at most `length`) and the user's counters."""

    history: np.ndarray
    history_ts: np.ndarray
    counters: dict[str, int]


class FeatureState:
    """The in-process state (one replica, or the one a `StateActor` holds). Thread-safe."""

    def __init__(self, tables: dict[str, pd.DataFrame], meta: dict[str, Any], history, ft, n_users: int,
                 n_items: int):
        self.meta, self.ft = meta, ft
        self.as_of = int(meta["as_of"])
        self.strength = float(meta["ctr_prior_strength"])
        self.long_len, self.short_len = int(meta["long_len"]), int(meta["short_len"])
        self.n_users, self.n_items = n_users, n_items
        self.user_exposures = _by_key(tables["users"], "user_key", "exposures", n_users)
        self.item_exposures = _by_key(tables["items"], "item_key", "exposures", n_items)
        self.item_clicks = _by_key(tables["items"], "item_key", "clicks", n_items)
        self.daily = DailyTotals(tables["daily"])
        a = tables["activity"]
        self._act_user = a["user_key"].to_numpy(np.int64)
        self._act = a[["day", "first_ts", "last_ts"]].to_numpy(np.int64)
        self._act_online: dict[int, dict[int, list[int]]] = {}
        # the logged timeline (HistoryStore), cut at as_of; clicks observed since, per user, sorted
        self.history = history
        off = history.offsets
        users = np.repeat(np.arange(len(off) - 1), np.diff(off))
        before = history.click_ts < self.as_of
        self._n_logged = np.bincount(users[before], minlength=max(n_users, len(off) - 1)).astype(np.int64)
        self._clicks_online: dict[int, list[tuple[int, int]]] = {}
        self._online_users: dict[str, int] = {}  # user id → key, for users the log did not have
        self._exp_online: dict[int, int] = {}  # their exposures
        self._lock = threading.Lock()

    @classmethod
    def load(cls, root: str | Path, history=None) -> FeatureState:
        """The snapshot an ingest wrote under `root`/state, with its click timelines and catalogue."""
        root = Path(root)
        folder = root / "state"
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(f"{folder} has no online-state snapshot (meta.json): this output was written "
                                    "by an older ingest; run `python -m jobs.ingest` again")
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"{folder}: state version {meta.get('version')}, this code reads {STATE_VERSION}")
        tables = {n: pd.read_parquet(folder / f"{n}.parquet") for n in ("users", "items", "activity", "daily")}
        return cls.from_tables(root, tables, meta, history)

    @classmethod
    def from_tables(cls, root: str | Path, tables: dict[str, pd.DataFrame], meta: dict[str, Any],
                    history=None) -> FeatureState:
        """A state from snapshot tables (`combine_state`'s) and the catalogue and timelines under `root`."""
        from pipeline.catalog import FeatureTables
        from pipeline.history import HistoryStore

        root = Path(root)
        items, users = pd.read_parquet(root / "items.parquet"), pd.read_parquet(root / "users.parquet")
        ft = FeatureTables.from_frames(items, users, [c for c in users.columns if c.startswith("u_") and c.endswith("_idx")])
        history = history or HistoryStore.load(root)
        return cls(tables, meta, history, ft.serving(), int(users["user_key"].max()) + 1,
                   int(items["item_key"].max()) + 1)

    # ------------------------------------------------------------------ online updates

    def online_key(self, user_id: str, create: bool = False) -> int:
        """The key of a user the log did not have (0 = none yet; with `create`, a new one)."""
        with self._lock:
            k = self._online_users.get(user_id, 0)
            if not k and create and len(self._online_users) < MAX_ONLINE_USERS:
                k = self._online_users[user_id] = self.n_users + len(self._online_users)
            return k

    def adopt_online_key(self, user_id: str, key: int) -> None:
        """Record the key another process gave a user born online (serving.state_store's replicated
        backend: the keys are handed out by one actor, so that every replica's copy agrees)."""
        with self._lock:
            self._online_users.setdefault(user_id, int(key))

    def observe_exposures(self, user_key: np.ndarray, item_key: np.ndarray, ts: np.ndarray) -> None:
        """Logged exposures (a served slate: one user, its items, one ts; or many rows at once)."""
        uk, ik, ts = _aligned(user_key, item_key, ts)
        ok = uk > 0
        with self._lock:
            known = ok & (uk < self.n_users)
            np.add.at(self.user_exposures, uk[known], 1)
            for u in uk[ok & ~known].tolist():
                self._exp_online[u] = self._exp_online.get(u, 0) + 1
            oki = (ik > 0) & (ik < self.n_items)
            np.add.at(self.item_exposures, ik[oki], 1)
            self.daily.add(ts, 1, 0)
            self._activity(uk[ok], ts[ok])

    def observe_clicks(self, user_key: np.ndarray, item_key: np.ndarray, click_ts: np.ndarray) -> None:
        """Clicks on exposures already observed (a /feedback click on a served slate): the item's clicks,
        the user's timeline (hence `user_clicks_before`), activity and the prior's daily clicks."""
        uk, ik, cts = _aligned(user_key, item_key, click_ts)
        with self._lock:
            oki = (ik > 0) & (ik < self.n_items)
            np.add.at(self.item_clicks, ik[oki], 1)
            self.daily.add(cts, 0, 1)
            ok = (uk > 0) & oki
            order = np.lexsort((ik[ok], cts[ok], uk[ok]))
            for u, i, t in zip(uk[ok][order].tolist(), ik[ok][order].tolist(), cts[ok][order].tolist(), strict=True):
                bisect.insort(self._clicks_online.setdefault(u, []), (t, i))
            self._activity(uk[ok], cts[ok])

    def observe_activity(self, user_key: np.ndarray, ts: np.ndarray) -> None:
        """Other logged events (a cart, a second click on one impression): they make the user active."""
        uk, _, ts = _aligned(user_key, user_key, ts)
        ok = uk > 0
        with self._lock:
            self._activity(uk[ok], ts[ok])

    def _activity(self, uk: np.ndarray, ts: np.ndarray) -> None:
        if not len(uk):
            return
        # first and last event time per (user, day), by one sort (a served slate is one group: no
        # DataFrame group-by per request, which cost ~1 ms of the replica's loop)
        day = ts // DAY
        order = np.lexsort((ts, day, uk))
        uk, day, ts = uk[order], day[order], ts[order]
        start = np.flatnonzero(np.r_[True, (uk[1:] != uk[:-1]) | (day[1:] != day[:-1])])
        end = np.r_[start[1:], len(ts)] - 1
        for u, d, lo, hi in zip(uk[start].tolist(), day[start].tolist(), ts[start].tolist(), ts[end].tolist(),
                                strict=True):
            days = self._act_online.get(u)
            if days is None:
                days = self._act_online[u] = {int(r[0]): [int(r[1]), int(r[2])] for r in self._base_activity(u)}
            cur = days.get(d)
            days[d] = [lo, hi] if cur is None else [min(cur[0], lo), max(cur[1], hi)]

    def _base_activity(self, u: int) -> np.ndarray:
        a, b = np.searchsorted(self._act_user, [u, u + 1])
        return self._act[a:b]

    # ------------------------------------------------------------------ reading

    def user_view(self, user_key: int, ts: int, length: int) -> UserView:
        """The user's history of clicks strictly before ts (last `length`) and counters at ts."""
        u = int(user_key)
        with self._lock:
            if 0 < u < len(self._n_logged) and u + 1 < len(self.history.offsets):
                a = self.history.offsets[u]
                keys, times = self.history.item_key[a:a + self._n_logged[u]], self.history.click_ts[a:a + self._n_logged[u]]
            else:
                keys = times = np.zeros(0, np.int64)
            online = self._clicks_online.get(u, [])
            if online:
                t_on = np.array([c[0] for c in online], np.int64)
                keys = np.r_[keys, np.array([c[1] for c in online], np.int64)]
                times = np.r_[times, t_on]
                order = np.lexsort((keys, times))  # the timeline's order: click time, then item key
                keys, times = keys[order], times[order]
            n_before = int(np.searchsorted(times, ts, side="left"))
            days = self._act_online.get(u)
            act = (np.array([[d, *v] for d, v in sorted(days.items())], np.int64).reshape(-1, 3) if days is not None
                   else (self._base_activity(u) if u > 0 else np.zeros((0, 3), np.int64)))
            counters = {"user_exposures_before": int(self.user_exposures[u]) if 0 < u < self.n_users
                        else self._exp_online.get(u, 0),
                        "user_clicks_before": n_before}
        for name, window in WINDOWS.items():
            counters[name] = _active_days(act, ts, window)
        lo = max(n_before - length, 0)
        return UserView(keys[lo:n_before].astype(np.int64), times[lo:n_before].astype(np.int64), counters)

    def rows(self, view: UserView, user_key: int, item_keys: np.ndarray, ts: int, position: int | np.ndarray = 0
             ) -> dict[str, np.ndarray]:
        """The ranking rows of one user's candidates at ts (`position`: the 0-based slate slot each will take;
        0 by default, as every candidate is scored for the first slot) — `ranking_features` on the state."""
        ik = np.asarray(item_keys, dtype=np.int64)
        c = len(ik)
        ikc = np.where((ik > 0) & (ik < self.n_items), ik, 0)
        with self._lock:
            counters = {n: np.full(c, v, np.int64) for n, v in view.counters.items()}
            counters["item_exposures_before"] = np.where(ikc > 0, self.item_exposures[ikc], 0)
            counters["item_clicks_before"] = np.where(ikc > 0, self.item_clicks[ikc], 0)
            prior = np.full(c, self.daily.prior_at(np.array([ts]))[0])
        u = np.full(c, int(user_key) if 0 < int(user_key) < self.n_users else 0, np.int64)
        t = np.full(c, int(ts), np.int64)
        out = ranking_features(u, ikc, t, np.broadcast_to(np.asarray(position, np.int64), (c,)), counters, prior,
                               self.ft, self.strength, self.long_len, self.short_len)
        return out | {"user_key": u, "item_key": ikc, "ts": t}

    def user_rows(self, user_key: int, item_keys: np.ndarray, ts: int, position: int | np.ndarray = 0
                  ) -> dict[str, np.ndarray]:
        """`rows` with the user's counters at ts: what a stage scores (its history comes with the request)."""
        return self.rows(self.user_view(user_key, ts, 0), user_key, item_keys, ts, position)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"users_with_online_clicks": len(self._clicks_online), "online_users": len(self._online_users),
                    "online_clicks": sum(len(v) for v in self._clicks_online.values()),
                    "exposures": int(self.user_exposures.sum()), "item_clicks": int(self.item_clicks.sum())}


def _active_days(act: np.ndarray, ts: int, window: int) -> int:
    """Distinct days with an event in [ts − window, ts), from each day's (day, first, last) event time: a day
    is shorter than the window, so only the first day can start before the window and only the last can
    reach past ts."""
    if not len(act):
        return 0
    lo = ts - window
    d, first, last = act[:, 0], act[:, 1], act[:, 2]
    inside = (d >= lo // DAY) & (d <= ts // DAY) & ((d != lo // DAY) | (last >= lo)) & ((d != ts // DAY) | (first < ts))
    return int(inside.sum())


def _by_key(frame: pd.DataFrame, key: str, col: str, n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    k = frame[key].to_numpy(np.int64)
    ok = (k > 0) & (k < n)
    out[k[ok]] = frame[col].to_numpy(np.int64)[ok]
    return out


def _aligned(a, b, ts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = np.atleast_1d(np.asarray(b, dtype=np.int64))
    a = np.broadcast_to(np.asarray(a, dtype=np.int64), b.shape).copy()
    ts = np.broadcast_to(np.asarray(ts, dtype=np.int64), b.shape).copy()
    return a, b, ts


