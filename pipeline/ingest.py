"""Ingest: raw tables → validated events → leak-free examples on disk.

`run_ingest(cfg)` runs on Ray: the read and validation on Ray Data (`map_batches`); the per-user
and per-item passes as a hash shuffle of plain Ray tasks over buckets of users/items
(`pipeline.shuffle.map_groups`: each call vectorised over many users); the statistics as one task
per block; the outputs written as Parquet per split, one task per finalised partition
(`pipeline.outputs.write_examples`, the same writer as the single-process path).
`run_ingest_local(cfg, tables)` runs the same pure functions in one process with pandas: the
reference in tests and the baseline in benchmarks/pipeline.py.

Output folder:
  ranking/split=*/   one row per exposure (impression, unpaired click, or sampled negative)
  retrieval/split=*/ one row per click, with hard negatives and the target's title tokens
  clicks/            the click timelines (user_key, click_ts, item_key) for history gathering
  state/             the online-state snapshot serving starts from (pipeline/state.py): counters,
                     activity and the prior's daily totals as of the end of the log
  items.parquet, users.parquet, vocab.json, feature_spec.json, stats.json
  rejects/           every rejected row with its reason (events/, duplicates/, catalog.parquet)
(written by pipeline/outputs.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs import FunnelConfig
from pipeline.catalog import BaseVocabs, Catalog, FeatureTables, build_catalog, finalize
from pipeline.examples import (
    ExampleContext,
    annotate_user_events,
    assign_split,
    examples_mask,
    item_counters,
    numpy_frame,
)
from pipeline.outputs import (
    output_folder,
    write_examples,
    write_meta,
)
from pipeline.partials import (
    OUTPUT_STAT_COLUMNS,
    USER_PASS_STAT_COLUMNS,
    both_id_counts,
    combine_id_counts,
    combine_output_stats,
    combine_user_pass,
    combine_validated,
    id_counts,
    output_stats,
    user_pass_stats,
    validated_stats,
)
from pipeline.readers import RawTables
from pipeline.state import write_state
from pipeline.validate import (
    CORE_EVENT_KINDS,
    EventRules,
    rejects_frame,
    table_rejects,
    validate_events,
    validate_table,
)


@dataclass
class Plan:
    """What the driver decides before the heavy passes."""

    cfg: FunnelConfig
    rules: EventRules
    items: pd.DataFrame
    users: pd.DataFrame
    catalog_rejects: pd.DataFrame
    has_impressions: bool
    source: str
    input_counts: dict[str, int]


def make_plan(cfg: FunnelConfig, raw: RawTables) -> Plan:
    items_v = validate_table(raw.items, "item_id")
    users_v = validate_table(raw.users, "user_id")
    rejects = pd.concat([table_rejects(items_v, "items", "item_id"), table_rejects(users_v, "users", "user_id")])
    d = cfg.data
    max_ts = d.max_ts or int(time.time()) + 86_400
    rules = EventRules(
        allowed_kinds=tuple(dict.fromkeys((*CORE_EVENT_KINDS, *d.extra_event_kinds))),
        min_ts=d.min_ts,
        max_ts=max_ts,
        require_item_metadata=d.require_item_metadata,
    )
    return Plan(
        cfg=cfg,
        rules=rules,
        items=items_v[items_v["reject_reason"] == ""].drop(columns="reject_reason"),
        users=users_v[users_v["reject_reason"] == ""].drop(columns="reject_reason"),
        catalog_rejects=rejects,
        has_impressions=raw.has_impressions,
        source=raw.source,
        input_counts={"items": len(raw.items), "users": len(raw.users),
                      **({"served_events": raw.served_events} if raw.served_events else {})},
    )


def split_times(t_min: int, t_max: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    """Train/val/test boundaries as fractions of the time range: by time, never by row."""
    span = t_max - t_min + 1
    return int(t_min + span * (1 - val_frac - test_frac)), int(t_min + span * (1 - test_frac))


def _catalog(plan: Plan, items: pd.DataFrame, users: pd.DataFrame) -> Catalog:
    """`items`/`users`: per-id counts indexed by id (from `id_counts`, summed)."""
    d = plan.cfg.data
    if d.vocab_from and Path(d.vocab_from).resolve() == Path(d.output).resolve():
        raise ValueError(f"data.vocab_from is data.output ({d.output}): extend an earlier ingest, into a new folder")
    return build_catalog(
        plan.items, plan.users, items.index.to_numpy(), users.index.to_numpy(),
        items["train_exp"][items["train_exp"] > 0], users["train_exp"][users["train_exp"] > 0],
        d.min_count, d.title_len, BaseVocabs.load(d.vocab_from) if d.vocab_from else None,
    )


def _context(plan: Plan, cat: Catalog, train_clicks: pd.Series) -> ExampleContext:
    d = plan.cfg.data
    return ExampleContext(
        has_impressions=plan.has_impressions,
        num_negatives=d.num_negatives,
        negative_sampling=d.negative_sampling,
        max_hard_negatives=d.max_hard_negatives,
        seed=plan.cfg.world.seed,
        item_weights=cat.weights_by_key(train_clicks) + 1e-3,  # a floor so every item can be drawn
        item_first_seen=FeatureTables.from_catalog(cat).first_seen,
    )


def _keyed(df: pd.DataFrame, item_index: pd.Index, user_index: pd.Index, buckets: int) -> pd.DataFrame:
    out = numpy_frame(df).copy()
    out["item_key"] = item_index.get_indexer(pd.Index(df["item_id"])) + 1
    out["user_key"] = user_index.get_indexer(pd.Index(df["user_id"])) + 1
    for c in ("request_id", "position"):
        out[c] = pd.to_numeric(out[c], errors="coerce").fillna(-1).astype(np.int64)
    out["bucket"] = out["user_key"] % buckets
    return out


def _accepted(df: pd.DataFrame) -> pd.DataFrame:
    """The accepted rows of a validated block, without their (empty) reject reason."""
    df = numpy_frame(df)
    return df[df["reject_reason"] == ""].drop(columns="reject_reason")


def _accepted_keyed(df: pd.DataFrame, item_index: pd.Index, user_index: pd.Index, buckets: int) -> pd.DataFrame:
    """The user pass's map side: the accepted rows of a validated block, keyed and bucketed."""
    return _keyed(_accepted(df), item_index, user_index, buckets)


def _split_and_bucket(df: pd.DataFrame, t_val: int, t_test: int, buckets: int) -> pd.DataFrame:
    df = numpy_frame(df)
    out = df[examples_mask(df)].copy()
    out["split"] = assign_split(out["ts"].to_numpy(), t_val, t_test)
    out["ibucket"] = out["item_key"] % buckets
    return out


def _write_and_stats(df: pd.DataFrame, out: str, ft: FeatureTables, n_hard: int, profile: list[str],
                     part: int) -> Any:
    """A finalised partition's three outputs written (`write_examples`); its output statistics returned."""
    write_examples(df, out, ft, n_hard, profile, part)
    return output_stats(df[OUTPUT_STAT_COLUMNS])


def _dup_rejects(df: pd.DataFrame) -> pd.DataFrame:
    df = numpy_frame(df)
    d = df[df["dup"]].copy()
    d["reject_reason"] = "duplicate_event"
    return rejects_frame(d, "events")


# --------------------------------------------------------------------------- single process


def run_ingest_local(cfg: FunnelConfig, raw_events: pd.DataFrame, raw: RawTables) -> dict[str, Any]:
    """The whole ingest in one process with pandas (same transforms, no Ray), into a temporary
    folder renamed into place on success (pipeline.outputs.output_folder)."""
    with output_folder(cfg) as out:
        return _ingest_local(cfg, out, raw_events, raw)


@dataclass
class UserPass:
    """The single-process ingest up to its user pass: what `_ingest_local` goes on from, and what
    tests/data/test_feature_parity.py replays through the online state."""

    plan: Plan
    raw_rows: int
    rejected: pd.DataFrame
    accepted: int
    t_val: int
    t_test: int
    as_of: int  # one second after the last accepted event: the state snapshot's time
    cat: Catalog
    p1: pd.DataFrame  # annotate_user_events' output over every accepted event


def user_pass_local(cfg: FunnelConfig, raw_events: pd.DataFrame, raw: RawTables,
                    clock: StageClock | None = None) -> UserPass:
    clock = clock or StageClock()
    plan = make_plan(cfg, raw)
    v = validate_events(raw_events, plan.rules, pd.Index(plan.items["item_id"]))
    rejected = rejects_frame(v, "events")
    acc = v[v["reject_reason"] == ""].drop(columns="reject_reason")
    clock.mark("validate")
    t_val, t_test = split_times(int(acc["ts"].min()), int(acc["ts"].max()), cfg.data.val_frac, cfg.data.test_frac)
    items_n, users_n = id_counts(acc, "item_id", t_val).set_index("item_id"), id_counts(acc, "user_id", t_val).set_index("user_id")
    clock.mark("id counts")
    cat = _catalog(plan, items_n, users_n)
    ctx = _context(plan, cat, items_n["train_click"])
    keyed = _keyed(acc, cat.item_index, cat.user_index, 1)
    p1 = annotate_user_events(keyed, ctx)
    clock.mark("user pass")
    return UserPass(plan, len(raw_events), rejected, len(acc), t_val, t_test, int(acc["ts"].max()) + 1, cat, p1)


def _ingest_local(cfg: FunnelConfig, out: Path, raw_events: pd.DataFrame, raw: RawTables) -> dict[str, Any]:
    clock = StageClock()
    up = user_pass_local(cfg, raw_events, raw, clock)
    plan, rejected, t_val, t_test, cat, p1 = up.plan, up.rejected, up.t_val, up.t_test, up.cat, up.p1
    dups = _dup_rejects(p1)
    us = combine_user_pass([user_pass_stats(p1, t_val, t_test, up.as_of)])  # the statistics the Ray path combines
    exp = _split_and_bucket(p1, t_val, t_test, 1)
    p2 = item_counters(exp)
    clock.mark("item pass")
    ft = FeatureTables.from_catalog(cat)
    d = cfg.data
    fin = finalize(p2, ft, us["past_prior"], d.ctr_prior_strength, d.long_len, d.short_len, d.max_hard_negatives)
    fin = fin.sort_values(["ts", "user_key", "item_key", "request_id"], kind="stable").reset_index(drop=True)
    clock.mark("finalize")
    write_examples(fin, out, ft, d.max_hard_negatives, cat.profile_fields)
    write_state(out, us["state"], up.as_of, d.ctr_prior_strength, d.long_len, d.short_len)
    clock.mark("write outputs")
    all_rejects = pd.concat([rejected, dups], ignore_index=True)
    all_rejects.to_parquet(out / "rejects" / "events.parquet", index=False)
    summary, moments = combine_output_stats([output_stats(fin)])
    stats = write_meta(out, plan, cat, summary, all_rejects["reason"].value_counts(), up.raw_rows,
                       up.accepted - len(dups), t_val, t_test, us["prior"], moments)
    clock.mark("output stats")
    return stats | {"stage_seconds": clock.seconds}


# --------------------------------------------------------------------------- Ray Data


def run_ingest(cfg: FunnelConfig, raw: RawTables | None = None) -> dict[str, Any]:
    """The ingest on Ray Data (local cluster or a real one); returns the stats dict. Writes into
    a temporary folder renamed into place on success (pipeline.outputs.output_folder)."""
    with output_folder(cfg) as out:
        return _ingest_ray(cfg, out, raw)


def _ingest_ray(cfg: FunnelConfig, out: Path, raw: RawTables | None) -> dict[str, Any]:
    """Ray Data reads and validates the events (materialised). From the validated blocks, plain Ray
    tasks do the rest of the heavy work (`pipeline.shuffle`): per-block statistics, the id counts,
    the user pass (a shuffle by user bucket), its statistics, the item pass (a shuffle by item
    bucket, `finalize` fused into its reduce tasks), then one task per finalised partition that
    writes its three outputs and returns its output statistics. Ray Data writes the rejects when
    there are any. Every statistic the driver needs comes back as per-block partials,
    catalogue-sized, never event-sized. Ray Data's shuffle ran in worker pools of its own, which
    cost 3 more workers on 2 CPUs; benchmarks/RESULTS.md, "Ingest"."""
    import ray
    from ray.data.expressions import col

    from pipeline.readers import read_source
    from pipeline.shuffle import block_partials, block_refs, map_groups

    configure_ray_data(cfg.data.progress)
    clock = StageClock()
    raw = raw or read_source(cfg)
    plan = make_plan(cfg, raw)
    P = max(1, cfg.data.num_partitions)
    known = pd.Index(plan.items["item_id"])

    validated = raw.events.map_batches(
        validate_events, batch_format="pandas", fn_kwargs={"rules": plan.rules, "known_items": known}
    ).materialize()
    clock.mark("read+validate")
    vblocks = block_refs(validated)
    vs = combine_validated(block_partials(vblocks, validated_stats, columns=["reject_reason", "ts"]))
    clock.mark("validated stats")
    if vs["rejected"]:
        validated.filter(expr=col("reject_reason") != "").map_batches(
            rejects_frame, batch_format="pandas", fn_kwargs={"table": "events"}
        ).write_parquet(str(out / "rejects" / "events"))
        clock.mark("write rejects")
    if vs["accepted"] == 0:
        raise ValueError("no event passed validation; see rejects/ for why")
    t_val, t_test = split_times(vs["ts_min"], vs["ts_max"], cfg.data.val_frac, cfg.data.test_frac)
    items_n, users_n = combine_id_counts(block_partials(vblocks, both_id_counts, {"t_val": t_val}, pre=_accepted))
    clock.mark("id counts")
    cat = _catalog(plan, items_n, users_n)
    ex_ctx = _context(plan, cat, items_n["train_click"])
    del items_n, users_n

    buckets = P * 4
    p1_refs = map_groups(
        vblocks, "bucket", P, annotate_user_events, {"ctx": ex_ctx}, pre=_accepted_keyed,
        pre_kwargs={"item_index": cat.item_index, "user_index": cat.user_index, "buckets": buckets},
        progress=cfg.data.progress, desc="user pass", max_parallel_reduces=cfg.data.max_parallel_reduces)
    p1 = ray.data.from_pandas_refs(p1_refs)
    del validated, vblocks
    clock.mark("user pass")
    as_of = vs["ts_max"] + 1
    us = combine_user_pass(block_partials([(r, None) for r in p1_refs], user_pass_stats,
                                          {"t_val": t_val, "t_test": t_test, "as_of": as_of},
                                          columns=USER_PASS_STAT_COLUMNS))
    clock.mark("user pass stats")
    if us["duplicates"]:
        p1.filter(expr=col("dup") == True).map_batches(  # noqa: E712
            _dup_rejects, batch_format="pandas").write_parquet(str(out / "rejects" / "duplicates"))
        clock.mark("write duplicates")
    ft = FeatureTables.from_catalog(cat)
    d = cfg.data
    fin_refs = map_groups(
        [(r, None) for r in p1_refs], "ibucket", P, item_counters,
        pre=_split_and_bucket, pre_kwargs={"t_val": t_val, "t_test": t_test, "buckets": buckets},
        post=finalize, post_kwargs={"ft": ft, "prior": us["past_prior"], "strength": d.ctr_prior_strength,
                                    "long_len": d.long_len, "short_len": d.short_len, "n_hard": d.max_hard_negatives},
        progress=cfg.data.progress, desc="item pass", max_parallel_reduces=cfg.data.max_parallel_reduces)
    del p1, p1_refs
    clock.mark("item pass")
    # one task per finalised partition writes its three outputs and returns its output statistics
    summary, moments = combine_output_stats(block_partials(
        [(r, None) for r in fin_refs], _write_and_stats, index_arg="part", max_in_flight=d.max_parallel_reduces,
        fn_kwargs={"out": str(out), "ft": ft, "n_hard": d.max_hard_negatives, "profile": cat.profile_fields}))
    del fin_refs
    write_state(out, us["state"], as_of, d.ctr_prior_strength, d.long_len, d.short_len)
    clock.mark("write outputs + output stats")
    reasons = vs["reasons"].add(pd.Series({"duplicate_event": us["duplicates"]}), fill_value=0)
    stats = write_meta(out, plan, cat, summary, reasons[reasons > 0].astype(np.int64), vs["rows"],
                       vs["accepted"] - us["duplicates"], t_val, t_test, us["prior"], moments)
    return stats | {"stage_seconds": clock.seconds}


def configure_ray_data(progress: bool) -> None:
    """The driver's Ray Data settings for the ingest (no Ray Data shuffle is left to configure:
    `pipeline.shuffle`); what Ray Data 2.60 costs on a small node is measured in
    benchmarks/RESULTS.md, "Ingest"."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress


# --------------------------------------------------------------------------- stage times


class StageClock:
    """Wall seconds per named stage (between consecutive `mark` calls); the ingest returns them
    as `stage_seconds` and benchmarks/pipeline.py prints them: where the time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 3)
        self._t = now
