"""The one definition of a ranking row's features, for training and serving alike.

`ranking_features` computes every feature column of (user, item, ts, position) rows from the
state those rows see — the user's and the item's past-only counters, the CTR prior of the day,
the catalogue tables — with NumPy only, vectorised over the rows. The ingest calls it over a
partition of examples (`pipeline.catalog.finalize`, counters from the two passes); serving
calls it over a request's candidates (`pipeline.state.FeatureState.rows`, counters from the
online state). tests/data/test_feature_parity.py holds the two paths equal, row for row.

Counters ("strictly before ts"), as the ingest defines them (pipeline/examples.py):
  user_exposures_before   logged exposures of the user (impressions, and clicks without one)
  user_clicks_before      the user's clicks by click time (= hist_end, the history's length)
  user_active_days_7/30   distinct UTC days with any event of the user in [ts − 7/30 d, ts)
  item_exposures_before, item_clicks_before   the same two for the item
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.examples import smoothed_ctr

if TYPE_CHECKING:
    from pipeline.catalog import FeatureTables

DAY = 86_400
USER_COUNTERS = ("user_active_days_7", "user_active_days_30", "user_exposures_before", "user_clicks_before")
ITEM_COUNTERS = ("item_exposures_before", "item_clicks_before")
COUNTERS = (*USER_COUNTERS, *ITEM_COUNTERS)


def context_features(ts: np.ndarray, position: np.ndarray) -> dict[str, np.ndarray]:
    """hour and day of week (UTC; 0 = Monday) of each row's time, and its slate position + 1 (0 = unknown:
    a sampled negative, or a logged row without a position; `position` is 0-based, −1 = absent)."""
    ts = np.asarray(ts, dtype=np.int64)
    position = np.asarray(position, dtype=np.int64)
    return {"position": np.where(position >= 0, position + 1, 0).astype(np.int32),
            "hour": ((ts // 3600) % 24).astype(np.int32),
            "dow": ((ts // DAY + 3) % 7).astype(np.int32)}  # 1970-01-01 was a Thursday


def item_age_days(ts: np.ndarray, first_seen: np.ndarray) -> np.ndarray:
    """Days since the item's release at ts, clamped at 0 (a row before its release is age 0); −1 where the
    release time is unknown (first_seen < 0)."""
    ts, fs = np.asarray(ts, dtype=np.int64), np.asarray(first_seen, dtype=np.int64)
    return np.where(fs >= 0, np.maximum(ts - fs, 0) / 86_400.0, -1.0).astype(np.float32)


def ranking_features(user_key: np.ndarray, item_key: np.ndarray, ts: np.ndarray, position: np.ndarray,
                     counters: dict[str, np.ndarray], prior: np.ndarray, ft: FeatureTables, strength: float,
                     long_len: int, short_len: int) -> dict[str, np.ndarray]:
    """Every feature column of a ranking row (RANKING_COLUMNS but the label and bookkeeping), in the dtypes
    the ingest writes. `counters`: the six COUNTERS per row; `prior`: the CTR prior at each row's ts
    (`PastPrior.at`); `ft`: the catalogue tables by key."""
    uk, ik = np.asarray(user_key, dtype=np.int64), np.asarray(item_key, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.int64)
    hist_end = np.asarray(counters["user_clicks_before"], dtype=np.int64)
    out = {
        "user_idx": ft.user_idx[uk], "item_idx": ft.item_idx[ik], "cat_idx": ft.cat_idx[ik],
        "brand_idx": ft.brand_idx[ik], **context_features(ts, position), "hist_end": hist_end,
        "seq_len_long": np.minimum(hist_end, long_len).astype(np.int32),
        "seq_len_short": np.minimum(hist_end, short_len).astype(np.int32),
    }
    for c in COUNTERS:
        out[c] = np.asarray(counters[c]).astype(np.int32)
    out["user_ctr"] = smoothed_ctr(out["user_clicks_before"], out["user_exposures_before"], prior, strength)
    out["item_ctr"] = smoothed_ctr(out["item_clicks_before"], out["item_exposures_before"], prior, strength)
    out["item_age_days"] = item_age_days(ts, ft.first_seen[ik])
    for f, arr in ft.profile.items():
        out[f] = arr[uk]
    return out
