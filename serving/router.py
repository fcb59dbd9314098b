"""A/B routing and the served-traffic event log.

- Sticky bucket: `bucket = int(sha256(f"{salt}:{user_id}")[:8], 16) mod 100`; arms own
  consecutive bucket ranges in the order of the config (`abtest.arms`, shares summing to 100).
  The same user always lands in the same arm; changing the salt reshuffles everyone.
- Event log: every exposure (one row per shown item, with its position) and every click,
  in the canonical events format of the ingest (`user_id, item_id, ts, event, request_id,
  position`) plus `arm` and `model_versions`, written as fsync'd Parquet segments on size, on a
  timer and at shutdown (`EventLog`) — the ingest reads served traffic back as new training logs.
- Served requests: the ingress remembers what it served (user, arm, slate, model versions)
  per request id, bounded (LRU); `/feedback` is checked against it — a click on a request it
  never served is refused, the arm logged is the server's own, and a click repeated for the
  same (request id, position) is logged once.
- Recent clicks: the clicks fed back since the log ended, per user, so the next request's
  history ends with them (training histories are every click strictly before the example's
  time; a served history frozen at the end of the log would be stale by hours or days).
  In-process and bounded (LRU over users): one per ingress replica — with several ingress
  replicas, put a shared store (Redis, a feature store) behind the same two methods.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

EVENT_COLUMNS = ["user_id", "item_id", "ts", "event", "request_id", "position", "arm", "model_versions"]


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
    """The served-traffic event log: thread-safe, append-only, durable up to a bounded window.

    Rows collect in memory and are written as one Parquet segment per flush under `folder`:
    when `max_rows` are waiting, every `max_age_s` (a timer thread), at `close()` (replica
    shutdown) and on `/flush`. A segment is written to a hidden temporary file, fsync'd, renamed
    into place and the folder fsync'd; only then are its rows dropped from memory, so a failed
    write loses nothing (the rows stay for the next flush) and a crash loses at most the rows of
    the last `max_age_s` (or `max_rows`). Segment names sort by time:
    `events-<snapshot ms>-<log id>-<seq>.parquet`, the snapshot time being the moment its rows
    were taken: every event appended before it is on disk once the segment is.
    """

    def __init__(self, folder: str | Path, max_rows: int = 20_000, max_age_s: float = 2.0):
        if max_rows < 1 or max_age_s <= 0:
            raise ValueError(f"event log: need max_rows >= 1 and max_age_s > 0, got {max_rows}, {max_age_s}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self.id = uuid.uuid4().hex[:8]
        self._rows: list[dict] = []
        self._lock = threading.Lock()  # the buffer
        self._flush_lock = threading.Lock()  # one writer at a time, never holding the buffer's lock
        self._seq = 0
        self.written_rows = 0
        self.failed_flushes = 0
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="event-log-flush", daemon=True)
        self._timer.start()

    def _append(self, rows: list[dict]) -> None:
        with self._lock:
            self._rows += rows
            full = len(self._rows) >= self.max_rows
        if full:
            self._flush_quietly()

    def exposures(self, user_id: str, item_ids: list[str], ts: int, request_id: str, arm: str,
                  versions: str = "") -> None:
        """One impression row per shown item; `versions` names the models that served the slate
        ("" for a non-model arm), e.g. "funnel-karma/3,funnel-lrea/2,funnel-cdnet/5"."""
        self._append([{"user_id": user_id, "item_id": i, "ts": ts, "event": "impression",
                       "request_id": request_id, "position": p, "arm": arm, "model_versions": versions}
                      for p, i in enumerate(item_ids)])

    def click(self, user_id: str, item_id: str, ts: int, request_id: str, position: int, arm: str,
              versions: str = "") -> None:
        self._append([{"user_id": user_id, "item_id": item_id, "ts": ts, "event": "click",
                       "request_id": request_id, "position": position, "arm": arm, "model_versions": versions}])

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def flush(self) -> Path | None:
        """Writes what is waiting as one segment and returns its path (None: nothing waited).
        Raises if the write fails; the rows are then still waiting."""
        with self._flush_lock:
            with self._lock:
                rows = self._rows[:]
                snapshot_ms = time.time_ns() // 1_000_000
            if not rows:
                return None
            path = self.folder / f"events-{snapshot_ms:013d}-{self.id}-{self._seq:06d}.parquet"
            tmp = self.folder / f".{path.name}.tmp"
            try:
                pd.DataFrame(rows, columns=EVENT_COLUMNS).to_parquet(tmp, index=False)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                _fsync_dir(self.folder)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._seq += 1
            with self._lock:
                del self._rows[: len(rows)]  # appends since the snapshot stay, in order
            self.written_rows += len(rows)
            return path

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as e:  # the rows stay; the next flush retries
            self.failed_flushes += 1
            print(f"[serve] event log: flush to {self.folder} failed ({e}); {self.pending()} rows kept", flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.max_age_s):
            self._flush_quietly()

    def close(self) -> Path | None:
        """Stops the timer and writes what is left (replica shutdown)."""
        self._stop.set()
        return self.flush()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Served:
    """What one served request showed: who, which arm, the slate, the model versions, when,
    and the positions already clicked (a repeated click is not logged twice)."""

    __slots__ = ("arm", "clicked", "items", "ts", "user_id", "versions")

    def __init__(self, user_id: str, arm: str, items: list[str], versions: str, ts: int):
        self.user_id, self.arm, self.items, self.versions, self.ts = user_id, arm, list(items), versions, int(ts)
        self.clicked: set[int] = set()


class ServedRequests:
    """request id → Served, the last `max_requests` (LRU). Per ingress replica; with several ingress
    replicas, serve.state_backend "actor" shares one (serving/state_store.py)."""

    def __init__(self, max_requests: int = 100_000):
        self.max_requests = max_requests
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_id: str, served: Served) -> None:
        with self._lock:
            self._served[request_id] = served
            if len(self._served) > self.max_requests:
                self._served.popitem(last=False)

    def get(self, request_id: str) -> Served | None:
        with self._lock:
            return self._served.get(request_id)

    def claim_id(self, request_id: str, positions: list[int]) -> list[int]:
        """`claim` by request id (what a shared registry can answer: serving/state_store.py)."""
        with self._lock:
            got = self._served.get(request_id)
        return self.claim(got, positions) if got is not None else []

    def claim(self, served: Served, positions: list[int]) -> list[int]:
        """The positions not clicked before (marked clicked now), in the order given, each once."""
        with self._lock:
            new = []
            for p in positions:
                if p not in served.clicked:
                    served.clicked.add(p)
                    new.append(p)
            return new


def read_events(folder: str | Path) -> pd.DataFrame:
    """The event log's rows, all segments in time order (pipeline.readers reads the same for the ingest)."""
    from pipeline.readers import read_event_segments

    return read_event_segments(folder, missing_ok=True)
