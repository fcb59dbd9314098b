"""The ingest's task shuffle (pipeline/shuffle.py) against pandas on the same frames, on real Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.shuffle import _run_windowed, block_partials, block_refs, map_groups

pytestmark = pytest.mark.ray


@pytest.fixture(autouse=True)
def _functions_by_value():
    """The per-group functions below travel to the workers by value: workers cannot import a test file."""
    import sys

    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    yield
    cp.unregister_pickle_by_value(sys.modules[__name__])


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"key": rng.integers(0, 37, n), "ts": rng.integers(0, 10_000, n), "x": rng.random(n)})


def _rank_in_group(df: pd.DataFrame, scale: float = 1.0) -> pd.DataFrame:
    """A per-group function that needs the whole group: each row's rank by ts within its key."""
    if df["key"].nunique() != 1:
        raise AssertionError("called with more than one group")
    out = df.sort_values(["ts", "x"]).copy()
    out["rank"] = np.arange(len(out)) * scale
    return out


def _drop_odd(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["ts"] % 2 == 0]


def _with_total(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(rows_in_partition=len(df))


def _canon(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["key", "ts", "x"]).reset_index(drop=True)[["key", "ts", "x", "rank"]]


@pytest.mark.parametrize("partitions", [1, 3, 64])  # 64 > 37 keys: some partitions are empty
def test_map_groups_is_a_groupby_apply_over_every_block(ray_session, partitions):
    ray = ray_session
    blocks = [_frame(n, s) for s, n in enumerate([500, 1, 0, 1_200])]
    refs = [(ray.put(b), None) for b in blocks]
    got = map_groups(refs, "key", partitions, _rank_in_group, {"scale": 2.0}, pre=_drop_odd)
    got = pd.concat(ray.get(got))
    every = _drop_odd(pd.concat(blocks))
    want = pd.concat([_rank_in_group(g, 2.0) for _, g in every.groupby("key")])
    pd.testing.assert_frame_equal(_canon(got), _canon(want))
    assert len(ray.get(map_groups(refs, "key", partitions, _rank_in_group))) <= min(partitions, 37)


def test_map_groups_post_runs_once_per_partition_and_reads_dataset_blocks(ray_session):
    import ray.data

    df = _frame(3_000, 7)
    ds = ray.data.from_pandas([df.iloc[:1_000], df.iloc[1_000:]]).materialize()
    parts = ray_session.get(map_groups(block_refs(ds), "key", 4, _rank_in_group, post=_with_total))
    assert sum(len(p) for p in parts) == len(df)
    assert all((p["rows_in_partition"] == len(p)).all() for p in parts)  # post saw the whole partition
    assert sorted(k for p in parts for k in p["key"].unique()) == sorted(df["key"].unique())  # a key in one place


def test_a_reduce_cap_keeps_the_output_and_never_has_more_tasks_in_flight(ray_session):
    ray = ray_session
    blocks = [_frame(n, s) for s, n in enumerate([700, 900])]
    refs = [(ray.put(b), None) for b in blocks]
    want = pd.concat(ray.get(map_groups(refs, "key", 5, _rank_in_group)))
    got = pd.concat(ray.get(map_groups(refs, "key", 5, _rank_in_group, max_parallel_reduces=1)))
    pd.testing.assert_frame_equal(_canon(got), _canon(want))

    task = ray.remote(lambda i: (i, 1)).options(num_returns=2)
    submitted: list = []

    def submit(i):
        if submitted:  # the earlier tasks not finished yet, by a look of our own (it can only see more done)
            done, _ = ray.wait(submitted, num_returns=len(submitted), timeout=0)
            assert len(submitted) - len(done) < 2, f"task {i} submitted with {len(submitted) - len(done)} in flight"
        out = task.remote(i)
        submitted.append(out[1])
        return out

    outs = _run_windowed(submit, 6, 2, False, "t")
    assert [ray.get(a) for a, _ in outs] == list(range(6))
    with pytest.raises(ValueError, match="max_parallel_reduces"):
        map_groups(refs, "key", 5, _rank_in_group, max_parallel_reduces=-1)


def test_block_partials_one_result_per_block(ray_session):
    blocks = [_frame(n, s) for s, n in enumerate([10, 0, 25])]
    refs = [(ray_session.put(b), None) for b in blocks]
    got = block_partials(refs, lambda d, k: int(d["ts"].sum()) * k, {"k": 3}, columns=["ts"], pre=_drop_odd)
    assert got == [int(_drop_odd(b)["ts"].sum()) * 3 for b in blocks]
    capped = block_partials(refs, lambda d, k, i: (i, len(d) * k), {"k": 2}, index_arg="i", max_in_flight=1)
    assert capped == [(i, len(b) * 2) for i, b in enumerate(blocks)]  # one at a time: same results, in order
