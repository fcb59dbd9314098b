"""serving.pauses: the collector's pauses are recorded per generation, and a frozen heap makes a
full collection walk only what was allocated since (the serving replica's p99 lever)."""

import gc
import time

from serving.pauses import GcPauses, freeze


class _Node:
    def __init__(self):
        self.ref = self  # a cycle: only the cyclic collector frees it


def _full_collection_ms(rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def test_pauses_are_counted_per_generation():
    p = GcPauses().install()
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        p.uninstall()
    snap = p.snapshot()
    assert snap["gen0"]["count"] >= 1 and snap["gen2"]["count"] >= 2
    assert snap["gen2"]["max_ms"] >= 0 and snap["gen2"]["total_ms"] >= snap["gen2"]["max_ms"]
    gc.collect(2)  # after uninstall: not counted
    assert p.snapshot()["gen2"]["count"] == snap["gen2"]["count"]


def test_freeze_takes_the_long_lived_heap_out_of_full_collections():
    heap = [{"k": [i]} for i in range(300_000)]  # a replica's imports: tracked, never garbage
    try:
        before = _full_collection_ms()
        frozen = freeze()
        after = _full_collection_ms()
        assert frozen >= len(heap)
        assert after < before / 3, (before, after)
        # a cycle created after the freeze is still collected
        _Node()
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        del heap
