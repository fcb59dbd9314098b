"""The served-traffic event log: flushed on size, on a timer and at close, fsync'd segments, and a
failed write loses nothing."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from serving.router import EventLog, read_events


def _exposures(log: EventLog, n: int, start: int = 0) -> None:
    for r in range(start, start + n):
        log.exposures(f"u{r}", [f"i{r}a", f"i{r}b"], 1_700_000_000 + r, f"r{r}", "treatment")


def test_flush_on_size_writes_before_clearing(tmp_path):
    log = EventLog(tmp_path, max_rows=10, max_age_s=3600)
    _exposures(log, 4)  # 8 rows: waiting
    assert log.pending() == 8 and not list(tmp_path.glob("events-*.parquet"))
    _exposures(log, 1, start=4)  # 10 rows: written
    assert log.pending() == 0 and log.written_rows == 10
    ev = read_events(tmp_path)
    assert len(ev) == 10 and ev["request_id"].tolist() == [f"r{r}" for r in range(5) for _ in range(2)]
    log.close()


def test_flush_on_timer_and_at_close(tmp_path):
    log = EventLog(tmp_path, max_rows=10_000, max_age_s=0.2)
    _exposures(log, 3)
    deadline = time.time() + 5
    while log.pending() and time.time() < deadline:
        time.sleep(0.05)
    assert log.pending() == 0 and len(read_events(tmp_path)) == 6
    log._stop.set()  # no timer: only close() can write the rest
    log._timer.join()
    _exposures(log, 2, start=3)
    assert log.close() is not None and len(read_events(tmp_path)) == 10


def test_segments_sort_by_snapshot_time_and_hide_partial_writes(tmp_path):
    log = EventLog(tmp_path, max_rows=10_000, max_age_s=3600)
    paths = []
    for k in range(3):
        _exposures(log, 1, start=k)
        paths.append(log.flush())
    assert [p.name for p in sorted(tmp_path.glob("events-*.parquet"))] == [p.name for p in paths]
    assert all(int(p.name.split("-")[1]) > 0 for p in paths)
    assert not list(tmp_path.glob(".*")) and log.flush() is None
    log.close()


def test_a_failed_write_keeps_every_row(tmp_path, monkeypatch):
    log = EventLog(tmp_path, max_rows=10_000, max_age_s=3600)
    _exposures(log, 3)
    real = pd.DataFrame.to_parquet

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        log.flush()
    assert log.pending() == 6 and not list(tmp_path.iterdir())
    _exposures(log, 1, start=3)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    log.flush()
    ev = read_events(tmp_path)
    assert log.pending() == 0 and ev["request_id"].tolist() == [f"r{r}" for r in range(4) for _ in range(2)]
    log.close()


def test_bad_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_rows"):
        EventLog(tmp_path, max_rows=0)
