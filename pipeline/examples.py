"""From validated events to leak-free examples: the pure, vectorised transforms.

Two passes, each a pure function of a frame holding *many* users (or items),
vectorised with sorts and segment searches — never a Python loop per user, row
or event. Ray Data calls them once per hash bucket of users (items); the
single-process path and the tests call them on the whole frame.

Pass 1, `annotate_user_events` (grouped by user):
  - exact duplicate events → rejected (`duplicate_event`), kept for the rejects set;
  - an exposure is an impression, or a click with no impression to pair with;
    a click pairs with the impression of the same (user, request, item), or,
    without request ids, with the latest impression of the same (user, item)
    at most `pair_window_s` earlier. label = clicked; click_ts = when;
  - the user's click timeline = label-1 exposures ordered by (click_ts, item);
    `hist_end` = number of clicks with click_ts < ts, i.e. strictly before the
    example's time. Sequences are gathered from the timeline at batch time
    (pipeline/history.py), so an example stores one cut-off, not L ids;
  - past-only user counters and state signals, all over events strictly before ts;
  - hard negatives of a click: label-0 exposures of the same request;
  - when the log has no impressions, `num_negatives` sampled negatives per click
    (uniform or by train popularity), never an item the user clicked at or before ts.

Pass 2, `item_counters` (grouped by item): item exposures and clicks strictly
before ts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

DAY = 86_400
NO_CLICK = np.iinfo(np.int64).max


@dataclass
class ExampleContext:
    has_impressions: bool = True
    num_negatives: int = 4
    negative_sampling: str = "popularity"
    max_hard_negatives: int = 8
    pair_window_s: int = 3600
    seed: int = 0
    # Sampling distribution over item keys (index = item key; 0 = padding never sampled).
    item_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # Each item key's first-seen time (release; -1 unknown): a sampled negative must be available at ts.
    item_first_seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def numpy_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Arrow-backed columns (as Ray Data hands them over) → numpy-backed ones."""
    conv = {}
    for c, dt in df.dtypes.items():
        if isinstance(dt, pd.ArrowDtype) or (pd.api.types.is_string_dtype(dt) and dt is not np.dtype(object)):
            kind = getattr(dt, "kind", "O")
            conv[c] = df[c].to_numpy(dtype=object if kind in "OSU" else None)
    if not conv:
        return df
    out = df.copy()
    for c, v in conv.items():
        out[c] = v
    return out


# --------------------------------------------------------------------------- segment helpers


def count_before(
    g_ref: np.ndarray, t_ref: np.ndarray, g_q: np.ndarray, t_q: np.ndarray, strict: bool = True
) -> np.ndarray:
    """For each query (g, t): how many reference rows of group g have time < t (<= if not strict).

    Groups and times are arbitrary int64; done with one lexsort and two searchsorted calls.
    """
    if len(t_q) == 0:
        return np.zeros(0, dtype=np.int64)
    _, inv = np.unique(np.concatenate([g_ref, g_q]), return_inverse=True)
    r_ref, r_q = inv[: len(g_ref)], inv[len(g_ref) :]
    all_t = np.concatenate([t_ref, t_q]) if len(t_ref) else t_q
    lo = int(all_t.min()) - 1
    span = int(all_t.max()) - lo + 2
    ref = np.sort(r_ref.astype(np.int64) * span + (t_ref - lo))
    q = r_q.astype(np.int64) * span + (t_q - lo)
    upto = np.searchsorted(ref, q, side="left" if strict else "right")
    start = np.searchsorted(ref, r_q.astype(np.int64) * span, side="left")
    return (upto - start).astype(np.int64)


def distinct_days_between(
    g_ev: np.ndarray, t_ev: np.ndarray, g_q: np.ndarray, lo_q: np.ndarray, hi_q: np.ndarray
) -> np.ndarray:
    """Distinct calendar days (UTC) with an event of group g in [lo, hi), per query."""
    if len(g_q) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(g_ev) == 0:
        return np.zeros(len(g_q), dtype=np.int64)
    order = np.lexsort((t_ev, g_ev))
    g, t = g_ev[order], t_ev[order]
    day = np.floor_divide(t, DAY)
    new_day = np.ones(len(t), dtype=bool)
    new_day[1:] = (g[1:] != g[:-1]) | (day[1:] != day[:-1])
    cum = np.cumsum(new_day)
    a = count_before(g, t, g_q, lo_q) + _group_start(g, g_q)
    b = count_before(g, t, g_q, hi_q) + _group_start(g, g_q)
    has = b > a
    out = np.zeros(len(g_q), dtype=np.int64)
    out[has] = cum[b[has] - 1] - cum[a[has]] + 1
    return out


def _group_start(g_sorted: np.ndarray, g_q: np.ndarray) -> np.ndarray:
    return np.searchsorted(g_sorted, g_q, side="left")


# --------------------------------------------------------------------------- pass 1: users


def _pair_clicks(ev: pd.DataFrame, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Row index of the impression each click pairs with (-1: none), and whether the
    click is the first of that impression (later clicks on it merge into it).

    The impression is the latest one at or before the click with the same (user,
    item, request); a click without a request id takes the latest impression of
    the same (user, item) at most `window` seconds earlier."""
    clicks = ev[ev["kind"] == 1]
    imps = ev[ev["kind"] == 0]
    target = pd.Series(-1, index=clicks.index, dtype=np.int64)
    with_req = (clicks["request_id"] >= 0).to_numpy()
    cols = ["user_key", "item_key", "request_id", "ts"]
    c_all = clicks.reset_index()[["index", *cols]]
    i_all = imps.reset_index()[["index", *cols]].rename(columns={"index": "imp"})
    for use_req in (True, False):
        c = c_all[with_req if use_req else ~with_req].sort_values("ts")
        i = i_all[i_all["request_id"] >= 0] if use_req else i_all
        if len(c) == 0 or len(i) == 0:
            continue
        by = ["user_key", "item_key", "request_id"] if use_req else ["user_key", "item_key"]
        m = pd.merge_asof(
            c.drop(columns=[] if use_req else ["request_id"]),
            i.sort_values("ts").drop(columns=[] if use_req else ["request_id"]),
            on="ts", by=by, direction="backward", tolerance=None if use_req else window,
        )
        target.loc[m["index"].to_numpy()] = m["imp"].fillna(-1).astype(np.int64).to_numpy()
    tgt = target.to_numpy()
    first = np.ones(len(tgt), dtype=bool)
    paired = tgt >= 0
    if paired.any():
        # the earliest click on an impression labels it; later ones merge into it
        cts = clicks["ts"].to_numpy()
        order = np.lexsort((cts, tgt))
        dup = np.zeros(len(tgt), dtype=bool)
        dup[order[1:]] = (tgt[order[1:]] == tgt[order[:-1]]) & (tgt[order[1:]] >= 0)
        first = ~dup
    return tgt, first


def _sample_negatives(pos: pd.DataFrame, ctx: ExampleContext) -> pd.DataFrame:
    """`num_negatives` items per positive (label-1 exposure), never one the user clicked at or before its
    ts, and only items available at ts (first seen at or before it; an unknown release time counts as
    available)."""
    k = ctx.num_negatives
    if k <= 0 or len(pos) == 0:
        return pos.iloc[0:0]
    n_keys = len(ctx.item_weights)
    w = ctx.item_weights.astype(np.float64).copy()
    w[0] = 0.0
    if ctx.negative_sampling == "uniform":
        w = (w > 0).astype(np.float64) if (w > 0).sum() > 0 else np.r_[0.0, np.ones(n_keys - 1)]
    cdf = np.cumsum(w) / w.sum()
    rng = np.random.default_rng([ctx.seed, int(pos["user_key"].min())])
    u = np.repeat(pos["user_key"].to_numpy(), k)
    t = np.repeat(pos["ts"].to_numpy(), k)
    # the user's first click time per item: forbidden at or after it
    ck = pos["user_key"].to_numpy() * n_keys + pos["item_key"].to_numpy()
    first_click = pd.Series(pos["click_ts"].to_numpy()).groupby(ck).min()
    keys, first_ts = first_click.index.to_numpy(), first_click.to_numpy()
    released = ctx.item_first_seen if len(ctx.item_first_seen) == n_keys else np.full(n_keys, -1, np.int64)
    items = np.zeros(len(u), dtype=np.int64)
    todo = np.ones(len(u), dtype=bool)
    for _ in range(16):  # rejection rounds over all pending draws at once (early rows: few items out yet)
        idx = np.nonzero(todo)[0]
        if len(idx) == 0:
            break
        cand = np.minimum(np.searchsorted(cdf, rng.random(len(idx)), side="right"), n_keys - 1)
        ck_q = u[idx] * n_keys + cand
        p = np.minimum(np.searchsorted(keys, ck_q), max(len(keys) - 1, 0))
        bad = (keys[p] == ck_q) & (first_ts[p] <= t[idx]) if len(keys) else np.zeros(len(idx), bool)
        ok = ~bad & (cand > 0) & (released[cand] <= t[idx])
        items[idx[ok]] = cand[ok]
        todo[idx[ok]] = False
    keep = ~todo
    neg = pos.iloc[np.repeat(np.arange(len(pos)), k)[keep]].copy()
    neg["item_key"] = items[keep]
    neg["event"] = "sampled_negative"
    neg["label"] = 0
    neg["click_ts"] = NO_CLICK
    neg["position"] = -1
    neg["dup"] = False
    return neg


def annotate_user_events(df: pd.DataFrame, ctx: ExampleContext) -> pd.DataFrame:
    """Pass 1 over the accepted events of many users; see the module docstring.

    Input columns: user_key, item_key, ts, event, request_id, position (int64;
    -1 = absent), plus any pass-through columns. Output: one row per input row
    (with `dup` and `is_exposure`) plus sampled negatives, and the features.
    """
    ev = numpy_frame(df).reset_index(drop=True).copy()
    codes, _ = pd.factorize(ev["event"].astype(str))
    ev["kind"] = np.select([ev["event"] == "impression", ev["event"] == "click"], [0, 1], 2)
    order = np.lexsort(
        (ev["position"].to_numpy(), ev["request_id"].to_numpy(), codes, ev["item_key"].to_numpy(),
         ev["ts"].to_numpy(), ev["user_key"].to_numpy())
    )
    ev = ev.iloc[order].reset_index(drop=True)
    codes = codes[order]
    keycols = np.stack([ev[c].to_numpy() for c in ("user_key", "item_key", "ts", "request_id", "position")] + [codes])
    dup = np.zeros(len(ev), dtype=bool)
    dup[1:] = (keycols[:, 1:] == keycols[:, :-1]).all(axis=0)
    ev["dup"] = dup

    valid = ev[~dup]
    tgt, first = _pair_clicks(valid, ctx.pair_window_s)
    click_idx = valid.index[valid["kind"].to_numpy() == 1]
    ev["label"] = 0
    ev["click_ts"] = NO_CLICK
    ev["is_exposure"] = (ev["kind"] == 0) & ~dup
    paired = tgt >= 0
    lab_imp = tgt[paired & first]
    ev.loc[lab_imp, "label"] = 1
    ev.loc[lab_imp, "click_ts"] = ev.loc[click_idx[paired & first], "ts"].to_numpy()
    unpaired = click_idx[~paired]
    ev.loc[unpaired, ["label", "is_exposure"]] = [1, True]
    ev.loc[unpaired, "click_ts"] = ev.loc[unpaired, "ts"]

    if not ctx.has_impressions:
        pos = ev[ev["is_exposure"] & (ev["label"] == 1)]
        neg = _sample_negatives(pos, ctx)
        ev = pd.concat([ev, neg], ignore_index=True)

    x = ev["is_exposure"].to_numpy()
    exp = ev[x]
    u, t = exp["user_key"].to_numpy(), exp["ts"].to_numpy()
    clk = exp[exp["label"] == 1]
    # Counters count logged events only: a sampled negative exists because of a click
    # that may come after its ts, so counting it would leak the future.
    logged = (exp["event"] != "sampled_negative").to_numpy()
    n = len(ev)

    def put(values: np.ndarray, dtype=np.int64) -> np.ndarray:
        out = np.zeros(n, dtype=dtype)
        out[x] = values
        return out

    hist_end = count_before(clk["user_key"].to_numpy(), clk["click_ts"].to_numpy(), u, t)
    ev["hist_end"] = put(hist_end)
    ev["user_clicks_before"] = ev["hist_end"]
    ev["user_exposures_before"] = put(count_before(u[logged], t[logged], u, t))
    act = ev[~ev["dup"] & (ev["event"] != "sampled_negative")]
    g_ev, t_ev = act["user_key"].to_numpy(), act["ts"].to_numpy()
    ev["user_active_days_7"] = put(distinct_days_between(g_ev, t_ev, u, t - 7 * DAY, t))
    ev["user_active_days_30"] = put(distinct_days_between(g_ev, t_ev, u, t - 30 * DAY, t))
    ev[[f"hard_neg_{j}" for j in range(ctx.max_hard_negatives)]] = _hard_negatives(ev, ctx.max_hard_negatives)
    return ev.drop(columns=["kind"])


def _hard_negatives(ev: pd.DataFrame, h: int) -> np.ndarray:
    """(n, h) item keys: label-0 exposures of the same (user, request) as each click; 0 = none."""
    out = np.zeros((len(ev), h), dtype=np.int64)
    if h == 0:
        return out
    x = ev["is_exposure"].to_numpy() & (ev["request_id"].to_numpy() >= 0)
    neg = ev[x & (ev["label"].to_numpy() == 0) & (ev["event"].to_numpy() != "sampled_negative")]
    pos = ev[x & (ev["label"].to_numpy() == 1)]
    if len(neg) == 0 or len(pos) == 0:
        return out
    neg = neg.sort_values(["user_key", "request_id", "position", "item_key"])
    j = neg.groupby(["user_key", "request_id"], sort=False).cumcount().to_numpy()
    neg = neg[j < h].assign(j=j[j < h])
    wide = neg.pivot_table(index=["user_key", "request_id"], columns="j", values="item_key", aggfunc="first", fill_value=0)
    wide = wide.reindex(columns=range(h), fill_value=0)
    got = pos[["user_key", "request_id"]].merge(wide, left_on=["user_key", "request_id"], right_index=True, how="left")
    out[np.nonzero(x & (ev["label"].to_numpy() == 1))[0]] = got[list(range(h))].fillna(0).to_numpy(np.int64)
    return out


# --------------------------------------------------------------------------- pass 2: items


def item_counters(df: pd.DataFrame) -> pd.DataFrame:
    """Pass 2 over exposures of many items: item exposures and clicks strictly before ts."""
    out = numpy_frame(df).copy()
    g, t = out["item_key"].to_numpy(), out["ts"].to_numpy()
    lab = out["label"].to_numpy() == 1
    logged = (out["event"] != "sampled_negative").to_numpy()  # see annotate_user_events
    out["item_exposures_before"] = count_before(g[logged], t[logged], g, t)
    out["item_clicks_before"] = count_before(g[lab], out["click_ts"].to_numpy()[lab], g, t)
    return out


DEFAULT_PRIOR = 0.05  # the smoothing prior where nothing was logged yet


def examples_mask(df: pd.DataFrame) -> np.ndarray:
    """The user pass's rows that become examples: exposures, duplicates dropped."""
    return df["is_exposure"].to_numpy().astype(bool) & ~df["dup"].to_numpy().astype(bool)


def daily_counts(df: pd.DataFrame, as_of: int | None = None) -> pd.DataFrame:
    """Per day: logged exposures (by their ts) and clicks (by their click time) of a partition, those
    before `as_of` when given (the online state's snapshot); summed over partitions,
    `PastPrior.from_counts` turns them into the past-only prior."""
    df = numpy_frame(df)
    logged = (df["event"] != "sampled_negative").to_numpy()
    clicked = df["label"].to_numpy() == 1
    if as_of is not None:
        logged = logged & (df["ts"].to_numpy() < as_of)
        clicked = clicked & (df["click_ts"].to_numpy() < as_of)
    exp = pd.Series(1, index=df["ts"].to_numpy()[logged] // DAY).groupby(level=0).sum()
    clk = pd.Series(1, index=df["click_ts"].to_numpy()[clicked] // DAY).groupby(level=0).sum()
    out = pd.DataFrame({"exposures": exp, "clicks": clk}).fillna(0).astype(np.int64)
    return out.rename_axis("day").reset_index()


def prior_from_totals(exp_before: np.ndarray, clk_before: np.ndarray) -> np.ndarray:
    """The CTR prior from the exposures and clicks logged before a day: their CTR, or DEFAULT_PRIOR where
    nothing was logged yet, clipped away from 0 and 1 (`PastPrior` and the online state's `DailyTotals`)."""
    prior = np.where(exp_before > 0, clk_before / np.maximum(exp_before, 1), DEFAULT_PRIOR)
    return np.clip(prior, 1e-4, 1 - 1e-4)


@dataclass
class PastPrior:
    """The CTR smoothing prior as of each day, past-only like every other counter: the logged
    CTR of all exposures before that day's start (clicks counted by their own time), or
    DEFAULT_PRIOR where nothing came before. `at(ts)` looks it up per row."""

    day0: int
    prior: np.ndarray  # (days,) the prior of day day0 + i

    @classmethod
    def from_counts(cls, counts: pd.DataFrame) -> PastPrior:
        c = counts.groupby("day")[["exposures", "clicks"]].sum()
        if c.empty:
            return cls(0, np.array([DEFAULT_PRIOR]))
        days = np.arange(int(c.index.min()), int(c.index.max()) + 2)
        c = c.reindex(days, fill_value=0)
        exp_before = np.r_[0, np.cumsum(c["exposures"].to_numpy())[:-1]]
        clk_before = np.r_[0, np.cumsum(c["clicks"].to_numpy())[:-1]]
        return cls(int(days[0]), prior_from_totals(exp_before, clk_before))

    def at(self, ts: np.ndarray) -> np.ndarray:
        i = np.clip(np.asarray(ts, dtype=np.int64) // DAY - self.day0, 0, len(self.prior) - 1)
        return self.prior[i]


def smoothed_ctr(clicks: np.ndarray, exposures: np.ndarray, prior: float | np.ndarray,
                 strength: float) -> np.ndarray:
    """(clicks + strength·prior) / (exposures + strength): past-only and shrunk to the prior."""
    return ((clicks + strength * prior) / (exposures + strength)).astype(np.float32)


def assign_split(ts: np.ndarray, t_val: int, t_test: int) -> np.ndarray:
    return np.where(ts < t_val, "train", np.where(ts < t_test, "val", "test"))
