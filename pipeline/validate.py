"""Row validation that loses nothing.

Every row that breaks the data contract is kept with the reason it was
rejected; for every run, input rows = accepted + rejected. One reason per row,
the first that applies in the order of `EVENT_REASONS`. Exact duplicates are
found in the per-user pass (pipeline/examples.py), where all copies of a row
meet; their reason is `duplicate_event`.

The functions here are pure pandas, applied by Ray Data `map_batches` and
unit-tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.examples import numpy_frame

CORE_EVENT_KINDS = ("impression", "click")
EVENT_REASONS = (
    "missing_user_id",
    "missing_item_id",
    "unparsable_timestamp",
    "negative_timestamp",
    "timestamp_out_of_range",
    "unknown_event_kind",
    "item_without_metadata",
    "duplicate_event",
)
ITEM_REASONS = ("missing_item_id", "duplicate_item_id")
USER_REASONS = ("missing_user_id", "duplicate_user_id")
REJECT_COLUMNS = ["table", "reason", "user_id", "item_id", "ts", "event", "request_id", "position", "raw"]


@dataclass(frozen=True)
class EventRules:
    """What a valid event row is, for one run."""

    allowed_kinds: tuple[str, ...]
    min_ts: int
    max_ts: int
    require_item_metadata: bool


def _missing(s: pd.Series) -> np.ndarray:
    m = s.isna().to_numpy().copy()
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        m = m | s.astype(str).str.strip().isin(["", "nan", "None", "NaN", "<NA>"]).to_numpy()
    return m


def normalize_ids(s: pd.Series) -> np.ndarray:
    """Ids as canonical strings, whatever the source typed them as: 42, 42.0 and " 42" are
    one id. Every table goes through this, so a log read from CSV joins a catalogue read
    from Parquet."""
    if pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
        return s.astype(np.int64).astype(str).to_numpy(dtype=object)
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        integral = np.isfinite(v) & (v == np.round(v))
        out = s.astype(str).to_numpy(dtype=object)
        out[integral] = v[integral].astype(np.int64).astype(str)
        return out
    out = s.astype(str).str.strip().to_numpy(dtype=object)
    num = pd.to_numeric(pd.Series(out), errors="coerce").to_numpy()
    integral = np.isfinite(num) & (num == np.round(num)) & pd.Series(out).str.fullmatch(r"-?\d+(\.0+)?").to_numpy()
    out[integral] = num[integral].astype(np.int64).astype(str)
    return out


def parse_timestamps(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Seconds since the epoch as int64, and a mask of unparsable values.

    Accepts integers, floats with no fractional loss beyond seconds, numeric
    strings, and ISO-8601 date-time strings (UTC when no zone is given).
    """
    num = pd.to_numeric(s, errors="coerce")
    ok = num.notna().to_numpy() & np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
    out = np.zeros(len(s), dtype=np.int64)
    out[ok] = np.floor(num.to_numpy(dtype=np.float64, na_value=0.0)[ok]).astype(np.int64)
    rest = ~ok & ~s.isna().to_numpy()
    if rest.any():
        dt = pd.to_datetime(s[rest].astype(str), errors="coerce", utc=True, format="ISO8601")
        good = dt.notna().to_numpy()
        idx = np.nonzero(rest)[0]
        out[idx[good]] = (dt[good].astype("int64") // 10**9).to_numpy()
        ok[idx[good]] = True
    return out, ~ok


def validate_events(df: pd.DataFrame, rules: EventRules, known_items: pd.Index | None) -> pd.DataFrame:
    """Canonical events in, the same rows out with `ts` parsed and a `reject_reason` column.

    `reject_reason` is "" for accepted rows; ids come out as canonical strings
    (`normalize_ids`). `known_items` is the item table's normalised ids; when `rules.require_item_metadata`, an event on any other item is
    rejected as `item_without_metadata`.
    """
    df = numpy_frame(df)
    n = len(df)
    reason = np.full(n, "", dtype=object)

    def mark(mask: np.ndarray, why: str) -> None:
        reason[(reason == "") & mask] = why

    mark(_missing(df["user_id"]), "missing_user_id")
    mark(_missing(df["item_id"]), "missing_item_id")
    ts, bad_ts = parse_timestamps(df["ts"])
    mark(bad_ts, "unparsable_timestamp")
    mark(ts < 0, "negative_timestamp")
    mark((ts < rules.min_ts) | (ts > rules.max_ts), "timestamp_out_of_range")
    kind = df["event"].astype(str).str.strip().str.lower()
    mark(~kind.isin(rules.allowed_kinds).to_numpy(), "unknown_event_kind")
    user_ids, item_ids = normalize_ids(df["user_id"]), normalize_ids(df["item_id"])
    if rules.require_item_metadata and known_items is not None:
        mark(known_items.get_indexer(pd.Index(item_ids)) < 0, "item_without_metadata")
    out = df.copy()
    out["user_id"] = user_ids
    out["item_id"] = item_ids
    out["ts_raw"] = df["ts"].astype(str)
    out["ts"] = ts
    out["event"] = kind.to_numpy()
    out["reject_reason"] = reason
    return out


def rejects_frame(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Rejected rows in the rejects dataset's schema: every value kept as text."""
    df = numpy_frame(df)
    rej = df[df["reject_reason"] != ""]
    cols = {}
    for c in ("user_id", "item_id", "event", "request_id", "position"):
        cols[c] = rej[c].astype(str).to_numpy() if c in rej else np.full(len(rej), "", dtype=object)
    cols["ts"] = rej["ts_raw"].to_numpy() if "ts_raw" in rej else rej.get("ts", pd.Series([""] * len(rej))).astype(str)
    extra = [c for c in rej.columns if c not in (*cols, "reject_reason", "ts_raw")]
    raw = rej[extra].astype(str).agg("|".join, axis=1).to_numpy() if extra and len(rej) else np.full(len(rej), "")
    return pd.DataFrame(
        {"table": table, "reason": rej["reject_reason"].to_numpy(), **cols, "raw": raw}, columns=REJECT_COLUMNS
    ).astype(str)


def validate_table(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """Items or users: missing and duplicate keys are rejected (the first copy is kept)."""
    reason = np.full(len(df), "", dtype=object)
    miss = _missing(df[key])
    reason[miss] = f"missing_{key}"
    ids = normalize_ids(df[key])
    dup = pd.Series(ids).duplicated(keep="first").to_numpy() & ~miss
    reason[dup] = f"duplicate_{key}"
    out = df.copy()
    out["reject_reason"] = reason
    out[key] = np.where(miss, "", ids)
    return out


def table_rejects(df: pd.DataFrame, table: str, key: str) -> pd.DataFrame:
    rej = df[df["reject_reason"] != ""]
    other = [c for c in rej.columns if c not in (key, "reject_reason")]
    raw = rej[other].astype(str).agg("|".join, axis=1).to_numpy() if other and len(rej) else np.full(len(rej), "")
    out = pd.DataFrame({c: np.full(len(rej), "", dtype=object) for c in REJECT_COLUMNS})
    out["table"] = table
    out["reason"] = rej["reject_reason"].to_numpy()
    out[key] = rej[key].astype(str).to_numpy()
    out["raw"] = raw
    return out.astype(str)
