"""A/B routing and the served-traffic event log.

- Sticky bucket: `bucket = int(sha256(f"{salt}:{user_id}")[:8], 16) mod 100`; arms own
  consecutive bucket ranges in the order of the config (`abtest.arms`, shares summing to 100).
  The same user always lands in the same arm; changing the salt reshuffles everyone.
- Event log: every exposure (one row per shown item, with its position) and every click,
  in the canonical events format of the ingest (`user_id, item_id, ts, event, request_id,
  position`) plus `arm` — the ingest reads served traffic back as new training logs.
- Recent clicks: the clicks fed back since the log ended, per user, so the next request's
  history ends with them (training histories are every click strictly before the example's
  time; a served history frozen at the end of the log would be stale by hours or days).
  In-process and bounded (LRU over users): one per ingress replica — with several ingress
  replicas, put a shared store (Redis, a feature store) behind the same two methods.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

EVENT_COLUMNS = ["user_id", "item_id", "ts", "event", "request_id", "position", "arm"]


def bucket(salt: str, user_id: str) -> int:
    return int(hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()[:8], 16) % 100


def buckets(salt: str, user_ids: list[str]) -> np.ndarray:
    return np.array([bucket(salt, u) for u in user_ids], dtype=np.int64)


class ArmRouter:
    def __init__(self, arms: dict[str, int], salt: str):
        if not arms or sum(arms.values()) != 100 or min(arms.values()) < 0:
            raise ValueError(f"abtest.arms must be non-negative shares summing to 100, got {arms}")
        self.salt = salt
        self.names = list(arms)
        self.upper = np.cumsum(list(arms.values()))  # arm i owns buckets [upper[i-1], upper[i])

    def arm(self, user_id: str) -> str:
        return self.names[int(np.searchsorted(self.upper, bucket(self.salt, user_id), side="right"))]


class EventLog:
    """Append-only, thread-safe; `flush()` writes one Parquet part per call under `folder`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict] = []
        self._lock = threading.Lock()

    def exposures(self, user_id: str, item_ids: list[str], ts: int, request_id: str, arm: str) -> None:
        with self._lock:
            self._rows += [{"user_id": user_id, "item_id": i, "ts": ts, "event": "impression",
                            "request_id": request_id, "position": p, "arm": arm} for p, i in enumerate(item_ids)]

    def click(self, user_id: str, item_id: str, ts: int, request_id: str, position: int, arm: str) -> None:
        with self._lock:
            self._rows.append({"user_id": user_id, "item_id": item_id, "ts": ts, "event": "click",
                               "request_id": request_id, "position": position, "arm": arm})

    def flush(self) -> Path | None:
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return None
        path = self.folder / f"events-{uuid.uuid4().hex[:12]}.parquet"
        pd.DataFrame(rows, columns=EVENT_COLUMNS).to_parquet(path, index=False)
        return path


class RecentClicks:
    """Per-user clicks since the log ended, time-ordered; `before(user, ts)` = those strictly before ts."""

    def __init__(self, max_users: int = 100_000, per_user: int = 200):
        self.max_users, self.per_user = max_users, per_user
        self._clicks: OrderedDict[str, list[tuple[int, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user_id: str, item_id: str, ts: int) -> None:
        with self._lock:
            clicks = self._clicks.setdefault(user_id, [])
            bisect.insort(clicks, (int(ts), item_id))
            del clicks[: -self.per_user]
            self._clicks.move_to_end(user_id)
            if len(self._clicks) > self.max_users:
                self._clicks.popitem(last=False)

    def before(self, user_id: str, ts: int) -> list[str] | None:
        with self._lock:
            clicks = self._clicks.get(user_id)
            if not clicks:
                return None
            n = bisect.bisect_left(clicks, (int(ts), ""))
            return [item for _, item in clicks[:n]] or None


def read_events(folder: str | Path) -> pd.DataFrame:
    parts = sorted(Path(folder).glob("events-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
