"""The ingest's two group-bys and its per-block statistics as plain Ray tasks.

`map_groups(blocks, key, P, fn)` does what Ray Data's
`ds.groupby(key, num_partitions=P).map_groups(fn)` does. One map task per input block
(optionally through a `pre` function) splits it by `key % P` into P frames (`num_returns=P`). Then
one reduce task per partition concatenates its P pieces, calls `fn` once per group of `key`
(in key order, as map_groups does), and optionally applies `post` to the result. The output is
one pandas frame per non-empty partition, as object refs: `ray.data.from_pandas_refs` turns them
back into a Dataset for the passes that follow.

Why not Ray Data's shuffle. In Ray Data 2.60, the shuffle's map and reduce tasks carry a
`runtime_env` of their own (`RAY_DATA_SHUFFLE_{MAP,REDUCE}_WORKER=1`), so they run in worker pools
of their own. On a 2-CPU node, that is 5 task workers instead of 2. Each pays ~1.7 s and ~210 MB
of imports, and each shuffle execution pays Ray Data's ~2 s ramp-up.
benchmarks/RESULTS.md, "Ingest", measures both. Plain tasks run in the default pool, where the
read and the map tasks already warmed the workers. Objects spill as usual when the object store
is full, so the bounded-memory run still completes.

The map tasks also absorb the Ray Data map stage before each shuffle (`pre`), and the reduce
tasks absorb the stage after it (`post`). One execution each instead of two.

`block_partials(blocks, fn)` is one task per block that returns `fn(block)`, a small statistic, for
the driver to combine. It replaces a Ray Data `map_batches(...).to_pandas()` execution over
blocks that already exist, and so skips that execution's ramp-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

Frame = pd.DataFrame
Fn = Callable[..., Frame]


def block_refs(ds) -> list[tuple[Any, tuple[int, int] | None]]:
    """(block ref, row slice or None) for every block of a Dataset, executing it if needed."""
    out = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry, s in zip(bundle.blocks, bundle.slices, strict=True):
            out.append((entry.ref, None if s is None else (s.start_offset, s.end_offset)))
    return out


def _as_frame(block: Any, rows: tuple[int, int] | None) -> Frame:
    from ray.data.block import BlockAccessor

    df = block if isinstance(block, pd.DataFrame) else BlockAccessor.for_block(block).to_pandas()
    return df if rows is None else df.iloc[rows[0]:rows[1]]


def _prepared(block: Any, rows: tuple[int, int] | None, pre: Fn | None, pre_kwargs: dict) -> Frame:
    """A block (or its row slice) as pandas, through `pre` when given: what every task starts from."""
    df = _as_frame(block, rows)
    return df if pre is None else pre(df, **pre_kwargs)


def _partial(block: Any, rows: tuple[int, int] | None, columns: list[str] | None, pre: Fn | None,
             pre_kwargs: dict, fn: Callable[..., Any], fn_kwargs: dict, index: dict) -> Any:
    df = _prepared(block, rows, pre, pre_kwargs)
    return fn(df if columns is None else df[columns], **fn_kwargs, **index)


def block_partials(blocks: list[tuple[Any, tuple[int, int] | None]], fn: Callable[..., Any],
                   fn_kwargs: dict | None = None, *, columns: list[str] | None = None, pre: Fn | None = None,
                   pre_kwargs: dict | None = None, index_arg: str | None = None, max_in_flight: int = 0) -> list[Any]:
    """`fn(pre(block)[columns], **fn_kwargs)` for every block, one task each, brought back to the
    driver; with `index_arg`, each call also gets the block's position under that name. Use it for
    catalogue-sized results (partial statistics), never for event-sized ones. `max_in_flight` (0 = no
    cap): at most that many tasks at once, for tasks that hold a whole partition (the writes)."""
    import ray

    task = ray.remote(_partial)
    pre_kw, fn_kw = ray.put(pre_kwargs or {}), ray.put(fn_kwargs or {})

    def submit(i: int) -> Any:
        ref, rows = blocks[i]
        return task.remote(ref, rows, columns, pre, pre_kw, fn, fn_kw, {index_arg: i} if index_arg else {})

    if max_in_flight <= 0 or max_in_flight >= len(blocks):
        return ray.get([submit(i) for i in range(len(blocks))])
    return ray.get(_run_windowed(submit, len(blocks), max_in_flight, False, "", ready=lambda out: out))


def _split(block: Any, rows: tuple[int, int] | None, pre: Fn | None, pre_kwargs: dict, key: str,
           parts: int) -> tuple[Frame, ...] | Frame:
    df = _prepared(block, rows, pre, pre_kwargs)
    if parts == 1:
        return df
    p = df[key].to_numpy() % parts
    return tuple(df[p == i] for i in range(parts))


def _reduce(key: str, fn: Fn, fn_kwargs: dict, post: Fn | None, post_kwargs: dict,
            *pieces: Frame) -> tuple[Frame | None, int]:
    pieces = tuple(x for x in pieces if len(x))
    if not pieces:
        return None, 0
    df = pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0].reset_index(drop=True)
    out = [fn(g.reset_index(drop=True), **fn_kwargs) for _, g in df.groupby(key, sort=True)]
    res = pd.concat(out, ignore_index=True) if len(out) > 1 else out[0]
    if post is not None:
        res = post(res, **post_kwargs)
    return res, len(res)


def map_groups(blocks: list[tuple[Any, tuple[int, int] | None]], key: str, num_partitions: int, fn: Fn,
               fn_kwargs: dict | None = None, *, pre: Fn | None = None, pre_kwargs: dict | None = None,
               post: Fn | None = None, post_kwargs: dict | None = None, progress: bool = False,
               desc: str = "shuffle", max_parallel_reduces: int = 0) -> list[Any]:
    """Refs of `post(concat(fn(group) for each group of key))` per partition (the empty ones left out),
    with `pre` applied to every block first; see the module docstring. Waits for every partition:
    the result is materialised, as `Dataset.materialize()` is. `blocks` as `block_refs` returns them,
    or (ref of a pandas frame, None) pairs.

    `max_parallel_reduces` (data.max_parallel_reduces; 0 = as many as the cluster's CPUs run): at
    most this many reduce tasks are submitted at once. A reduce holds its partition's pieces, their
    concatenation and `fn`'s output at the same time, the largest frames of the ingest, so the cap
    bounds the peak memory of a memory-bound run at the cost of its wall time."""
    import ray

    if max_parallel_reduces < 0:
        raise ValueError(f"data.max_parallel_reduces must be >= 0 (0 = no cap), got {max_parallel_reduces}")
    P = max(1, int(num_partitions))
    split = ray.remote(_split).options(num_returns=P)
    reduce = ray.remote(_reduce).options(num_returns=2)
    pre_kw, fn_kw, post_kw = (ray.put(k or {}) for k in (pre_kwargs, fn_kwargs, post_kwargs))
    mapped = [split.remote(ref, rows, pre, pre_kw, key, P) for ref, rows in blocks]
    if P == 1:
        mapped = [[m] for m in mapped]

    def submit(i: int, parts: list = mapped) -> tuple[Any, Any]:
        return reduce.remote(key, fn, fn_kw, post, post_kw, *[m[i] for m in parts])

    outs = _run_windowed(submit, P, min(P, max_parallel_reduces or P), progress, desc)
    del mapped, submit  # the split pieces go once every reduce that reads them has run
    counts = ray.get([n for _, n in outs])
    return [frame for (frame, _), n in zip(outs, counts, strict=True) if n]


def _run_windowed(submit: Callable[[int], Any], n: int, window: int, progress: bool, desc: str,
                  ready: Callable[[Any], Any] = lambda out: out[1]) -> list[Any]:
    """`submit(i)` for i in 0..n-1 with at most `window` tasks in flight; waits for all of them.
    `ready(out)`: the ref of a submission that says it finished (default: a reduce's row count)."""
    import ray
    from tqdm import tqdm

    outs: list[Any] = []
    with tqdm(total=n, desc=desc, unit="partition", disable=not progress) as bar:
        pending: list[Any] = []
        while len(outs) < n or pending:
            while len(outs) < n and len(pending) < window:
                outs.append(submit(len(outs)))
                pending.append(ready(outs[-1]))
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return outs
