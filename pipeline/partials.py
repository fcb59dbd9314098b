"""Per-block partial statistics of the ingest and how they combine: the same pure functions for the
local path (one block: the whole frame) and the Ray path (`map_batches` partials, combined on the
driver). Each is catalogue-sized or smaller, never event-sized."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.examples import DEFAULT_PRIOR, PastPrior, assign_split, daily_counts, examples_mask, numpy_frame
from pipeline.outputs import (
    NUMERIC_FIELDS,
    combine_moments,
    combine_summary,
    numeric_moments,
    partial_summary,
)
from pipeline.state import STATE_COLUMNS, combine_state, state_partials

EXPOSURE_KINDS = ("impression", "click")


def id_counts(df: pd.DataFrame, key: str, t_val: int) -> pd.DataFrame:
    """Per-id partial counts of one batch: all events, train exposures, train clicks.

    Summed over batches (Ray groupby-sum, or pandas), this gives the distinct ids
    and the train-period counts the vocabularies and the popularity sampler need —
    catalogue-sized, never event-sized, on the driver."""
    df = numpy_frame(df)
    train = df["ts"].to_numpy() < t_val
    ev = df["event"].to_numpy()
    return pd.DataFrame({
        key: df[key].to_numpy(),
        "n": np.ones(len(df), dtype=np.int64),
        "train_exp": (train & np.isin(ev, EXPOSURE_KINDS)).astype(np.int64),
        "train_click": (train & (ev == "click")).astype(np.int64),
    }).groupby(key, as_index=False, sort=False).sum()


def validated_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Rows, reject reasons, and the accepted rows' time range of one validated block."""
    reason = np.asarray(df["reject_reason"].to_numpy(), dtype=object)
    ok = reason == ""
    ts = np.asarray(df["ts"].to_numpy())[ok]
    return {"rows": len(df), "accepted": int(ok.sum()), "reasons": pd.Series(reason[~ok]).value_counts(),
            "ts_min": int(ts.min()) if len(ts) else None, "ts_max": int(ts.max()) if len(ts) else None}


def combine_validated(parts: list[dict[str, Any]]) -> dict[str, Any]:
    mins = [p["ts_min"] for p in parts if p["ts_min"] is not None]
    maxs = [p["ts_max"] for p in parts if p["ts_max"] is not None]
    reasons = pd.concat([p["reasons"] for p in parts]).groupby(level=0).sum() if parts else pd.Series(dtype=np.int64)
    return {"rows": sum(p["rows"] for p in parts), "accepted": sum(p["accepted"] for p in parts),
            "rejected": int(reasons.sum()), "reasons": reasons.astype(np.int64),
            "ts_min": min(mins) if mins else 0, "ts_max": max(maxs) if maxs else 0}


def both_id_counts(df: pd.DataFrame, t_val: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    return id_counts(df, "item_id", t_val), id_counts(df, "user_id", t_val)


def combine_id_counts(parts: list[tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-id counts summed over blocks, indexed by id (as `id_counts(...).set_index(key)`)."""
    items = pd.concat([p[0] for p in parts], ignore_index=True).groupby("item_id").sum()
    users = pd.concat([p[1] for p in parts], ignore_index=True).groupby("user_id").sum()
    return items, users


USER_PASS_STAT_COLUMNS = list(dict.fromkeys(["dup", "is_exposure", "ts", "label", "event", "click_ts", *STATE_COLUMNS]))


def user_pass_stats(df: pd.DataFrame, t_val: int, t_test: int, as_of: int) -> dict[str, Any]:
    """Duplicates, the daily counts behind the past-only prior, the train CTR and the online-state
    partials (pipeline/state.py, as of `as_of`) of one block of the user pass's output (its exposures:
    what the ingest's `_split_and_bucket` keeps)."""
    df = numpy_frame(df)
    exp = df[examples_mask(df)]
    train = assign_split(exp["ts"].to_numpy(), t_val, t_test) == "train"
    return {"duplicates": int(df["dup"].to_numpy().astype(bool).sum()), "daily": daily_counts(exp),
            "train_rows": int(train.sum()), "train_clicks": int(exp["label"].to_numpy()[train].sum()),
            "state": state_partials(df, as_of)}


def combine_user_pass(parts: list[dict[str, Any]]) -> dict[str, Any]:
    n, clicks = sum(p["train_rows"] for p in parts), sum(p["train_clicks"] for p in parts)
    return {"duplicates": sum(p["duplicates"] for p in parts), "prior": clicks / n if n else DEFAULT_PRIOR,
            "past_prior": PastPrior.from_counts(pd.concat([p["daily"] for p in parts], ignore_index=True)),
            "state": combine_state([p["state"] for p in parts])}


OUTPUT_STAT_COLUMNS = ["split", "label", "ts", "user_key", "item_key", "seq_len_long", *NUMERIC_FIELDS]


def output_stats(df: pd.DataFrame) -> dict[str, Any]:
    return {"summary": partial_summary(df), "moments": numeric_moments(df),
            "users": np.unique(df["user_key"].to_numpy()), "items": np.unique(df["item_key"].to_numpy())}


def combine_output_stats(parts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    summary = combine_summary(pd.concat([p["summary"] for p in parts], ignore_index=True)) | {
        "users": len(np.unique(np.concatenate([p["users"] for p in parts]))),
        "items": len(np.unique(np.concatenate([p["items"] for p in parts])))}
    return summary, combine_moments(pd.concat([p["moments"] for p in parts], ignore_index=True))
