"""The garbage collector's pauses in a serving process: measured, and kept short.

A serving replica imports Ray, Serve, FastAPI, MLflow and torch before it answers anything: about
350,000 objects the cyclic collector tracks (Python 3.11). None of them is ever garbage, yet every
full (generation 2) collection walks them all: 330 ms on the 2-core VM, measured with the demo's
FeatureStore and ranker loaded (benchmarks/RESULTS.md, "Serving load"). A full collection runs
when the objects that survived into the old generation since the last one reach a quarter of it,
so a replica answering 100 requests a second stops for a third of a second now and then, and every
request queued behind the pause waits for it: the p99 of an open-loop load.

- `freeze()` runs one collection and moves every object that survives it to the permanent
  generation (`gc.freeze`, the CPython documentation's advice for a process that forks or serves
  after a long start-up): later collections walk only what was allocated since. Garbage made of
  frozen objects is still freed by reference counting; only cycles among them are not.
- `GcPauses` records each collection's duration per generation (`gc.callbacks`), so a pause is a
  number in /healthz and in `benchmarks/serve_load.py`'s table, not a guess.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from typing import Any


def freeze() -> int:
    """Collect once, then freeze what survived; the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Counts and durations of this process's collections, per generation, since `install`."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self.recent_full: deque[float] = deque(maxlen=64)  # the last full collections' ms, oldest first
        self._t0 = 0.0
        self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        g = int(info.get("generation", 2))
        ms = (time.perf_counter() - self._t0) * 1000
        self.count[g] += 1
        self.total_ms[g] += ms
        self.max_ms[g] = max(self.max_ms[g], ms)
        if g == 2:
            self.recent_full.append(round(ms, 3))

    def install(self) -> GcPauses:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def snapshot(self) -> dict[str, Any]:
        """{"gen0".."gen2": {"count", "total_ms", "max_ms"}, "recent_full_ms": the last 64 full
        collections' durations, "frozen": objects in the permanent generation}."""
        out: dict[str, Any] = {f"gen{g}": {"count": self.count[g], "total_ms": round(self.total_ms[g], 3),
                                           "max_ms": round(self.max_ms[g], 3)} for g in range(3)}
        return out | {"recent_full_ms": list(self.recent_full), "frozen": gc.get_freeze_count()}
