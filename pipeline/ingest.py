"""Ingest: raw tables → validated events → leak-free examples on disk.

`run_ingest(cfg)` runs on Ray Data: validation and key mapping as `map_batches`,
the per-user and per-item passes as `groupby(bucket).map_groups` over hash
buckets of users/items (each call vectorised over many users), the outputs
written as Parquet per split. `run_ingest_local(cfg, tables)` runs the same pure
functions in one process with pandas: the reference in tests and the baseline
in benchmarks/pipeline.py.

Output folder:
  ranking/split=*/   one row per exposure (impression, unpaired click, or sampled negative)
  retrieval/split=*/ one row per click, with hard negatives and the target's title tokens
  clicks/            the click timelines (user_key, click_ts, item_key) for history gathering
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
import pyarrow.parquet as pq

from configs import FunnelConfig
from pipeline.catalog import Catalog, FeatureTables, build_catalog, finalize
from pipeline.examples import (
    DEFAULT_PRIOR,
    ExampleContext,
    PastPrior,
    annotate_user_events,
    assign_split,
    daily_counts,
    item_counters,
    numpy_frame,
)
from pipeline.outputs import (
    click_rows,
    combine_moments,
    combine_summary,
    numeric_moments,
    output_folder,
    partial_summary,
    ranking_rows,
    retrieval_rows,
    write_meta,
)
from pipeline.readers import RawTables
from pipeline.validate import (
    CORE_EVENT_KINDS,
    EventRules,
    rejects_frame,
    table_rejects,
    validate_events,
    validate_table,
)

EXPOSURE_KINDS = ("impression", "click")


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
        input_counts={"items": len(raw.items), "users": len(raw.users)},
    )


def split_times(t_min: int, t_max: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    """Train/val/test boundaries as fractions of the time range: by time, never by row."""
    span = t_max - t_min + 1
    return int(t_min + span * (1 - val_frac - test_frac)), int(t_min + span * (1 - test_frac))


def id_counts(df: pd.DataFrame, key: str, t_val: int) -> pd.DataFrame:
    """Per-id partial counts of one batch: all events, train exposures, train clicks.

    Summed over batches (Ray groupby-sum, or pandas), this gives the distinct ids
    and the train-period counts the vocabularies and the popularity sampler need —
    catalogue-sized, never event-sized, on the driver."""
    df = numpy_frame(df)
    train = df["ts"].to_numpy() < t_val
    ev = df["event"].to_numpy()
    return pd.DataFrame({
        key: df[key].to_numpy(),
        "n": np.ones(len(df), dtype=np.int64),
        "train_exp": (train & np.isin(ev, EXPOSURE_KINDS)).astype(np.int64),
        "train_click": (train & (ev == "click")).astype(np.int64),
    }).groupby(key, as_index=False, sort=False).sum()


def _sum_counts(parts: pd.DataFrame, key: str) -> pd.DataFrame:
    parts = parts.rename(columns=lambda c: c[4:-1] if c.startswith("sum(") else c)
    return parts.groupby(key).sum()


def _catalog(plan: Plan, items: pd.DataFrame, users: pd.DataFrame) -> Catalog:
    """`items`/`users`: per-id counts indexed by id (from `id_counts`, summed)."""
    return build_catalog(
        plan.items, plan.users, items.index.to_numpy(), users.index.to_numpy(),
        items["train_exp"][items["train_exp"] > 0], users["train_exp"][users["train_exp"] > 0],
        plan.cfg.data.min_count, plan.cfg.data.title_len,
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


def _split_and_bucket(df: pd.DataFrame, t_val: int, t_test: int, buckets: int) -> pd.DataFrame:
    df = numpy_frame(df)
    out = df[df["is_exposure"] & ~df["dup"]].copy()
    out["split"] = assign_split(out["ts"].to_numpy(), t_val, t_test)
    out["ibucket"] = out["item_key"] % buckets
    return out


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


def _ingest_local(cfg: FunnelConfig, out: Path, raw_events: pd.DataFrame, raw: RawTables) -> dict[str, Any]:
    plan = make_plan(cfg, raw)
    v = validate_events(raw_events, plan.rules, pd.Index(plan.items["item_id"]))
    rejected = rejects_frame(v, "events")
    acc = v[v["reject_reason"] == ""].drop(columns="reject_reason")
    t_val, t_test = split_times(int(acc["ts"].min()), int(acc["ts"].max()), cfg.data.val_frac, cfg.data.test_frac)
    items_n, users_n = id_counts(acc, "item_id", t_val).set_index("item_id"), id_counts(acc, "user_id", t_val).set_index("user_id")
    cat = _catalog(plan, items_n, users_n)
    ctx = _context(plan, cat, items_n["train_click"])
    keyed = _keyed(acc, cat.item_index, cat.user_index, 1)
    p1 = annotate_user_events(keyed, ctx)
    dups = _dup_rejects(p1)
    exp = _split_and_bucket(p1, t_val, t_test, 1)
    prior = float(exp.loc[exp["split"] == "train", "label"].mean()) if (exp["split"] == "train").any() else DEFAULT_PRIOR
    p2 = item_counters(exp)
    ft = FeatureTables.from_catalog(cat)
    d = cfg.data
    fin = finalize(p2, ft, PastPrior.from_counts(daily_counts(exp)), d.ctr_prior_strength, d.long_len, d.short_len, d.max_hard_negatives)
    fin = fin.sort_values(["ts", "user_key", "item_key", "request_id"], kind="stable").reset_index(drop=True)
    ranking_rows(fin, d.max_hard_negatives).to_parquet(out / "ranking", partition_cols=["split"], index=False)
    pq.write_to_dataset(retrieval_rows(fin, ft, d.max_hard_negatives, cat.profile_fields), out / "retrieval",
                        partition_cols=["split"])
    (out / "clicks").mkdir()
    click_rows(fin).to_parquet(out / "clicks" / "part-0.parquet", index=False)
    all_rejects = pd.concat([rejected, dups], ignore_index=True)
    all_rejects.to_parquet(out / "rejects" / "events.parquet", index=False)
    summary = combine_summary(partial_summary(fin)) | {
        "users": int(fin["user_key"].nunique()), "items": int(fin["item_key"].nunique())}
    return write_meta(out, plan, cat, summary, all_rejects["reason"].value_counts(), len(raw_events),
                       len(acc) - len(dups), t_val, t_test, prior, combine_moments(numeric_moments(fin)))


# --------------------------------------------------------------------------- Ray Data


def run_ingest(cfg: FunnelConfig, raw: RawTables | None = None) -> dict[str, Any]:
    """The ingest on Ray Data (local cluster or a real one); returns the stats dict. Writes into
    a temporary folder renamed into place on success (pipeline.outputs.output_folder)."""
    with output_folder(cfg) as out:
        return _ingest_ray(cfg, out, raw)


def _ingest_ray(cfg: FunnelConfig, out: Path, raw: RawTables | None) -> dict[str, Any]:
    from ray.data import DataContext
    from ray.data.expressions import col

    from pipeline.readers import read_source

    ctx_ray = DataContext.get_current()
    ctx_ray.enable_progress_bars = cfg.data.progress
    ctx_ray.shuffle_strategy = cfg.data.shuffle_strategy
    raw = raw or read_source(cfg)
    plan = make_plan(cfg, raw)
    P = max(1, cfg.data.num_partitions)
    known = pd.Index(plan.items["item_id"])
    rules = plan.rules

    validated = raw.events.map_batches(
        validate_events, batch_format="pandas", fn_kwargs={"rules": rules, "known_items": known}
    ).materialize()
    n_input = validated.count()
    rejected = validated.filter(expr=col("reject_reason") != "").map_batches(
        rejects_frame, batch_format="pandas", fn_kwargs={"table": "events"}
    ).materialize()
    rejected.write_parquet(str(out / "rejects" / "events"))
    acc = validated.filter(expr=col("reject_reason") == "").drop_columns(["reject_reason"]).materialize()
    n_acc = acc.count()
    if n_acc == 0:
        raise ValueError("no event passed validation; see rejects/ for why")
    t_val, t_test = split_times(int(acc.min("ts")), int(acc.max("ts")), cfg.data.val_frac, cfg.data.test_frac)
    counts = {
        key: _sum_counts(
            acc.map_batches(id_counts, batch_format="pandas", fn_kwargs={"key": key, "t_val": t_val})
            .groupby(key, num_partitions=P).sum(["n", "train_exp", "train_click"]).to_pandas(),
            key,
        )
        for key in ("item_id", "user_id")
    }
    cat = _catalog(plan, counts["item_id"], counts["user_id"])
    ex_ctx = _context(plan, cat, counts["item_id"]["train_click"])
    del counts

    buckets = P * 4
    keyed = acc.map_batches(
        _keyed, batch_format="pandas",
        fn_kwargs={"item_index": cat.item_index, "user_index": cat.user_index, "buckets": buckets},
    )
    p1 = keyed.groupby("bucket", num_partitions=P).map_groups(
        annotate_user_events, batch_format="pandas", fn_kwargs={"ctx": ex_ctx}
    ).materialize()
    dups = p1.filter(expr=col("dup") == True)  # noqa: E712
    dups.map_batches(_dup_rejects, batch_format="pandas").write_parquet(str(out / "rejects" / "duplicates"))
    n_dup = dups.count()
    exp = p1.map_batches(
        _split_and_bucket, batch_format="pandas", fn_kwargs={"t_val": t_val, "t_test": t_test, "buckets": buckets}
    ).materialize()
    del p1
    train_n = exp.filter(expr=col("split") == "train")
    prior = float(train_n.mean("label")) if train_n.count() else DEFAULT_PRIOR
    past_prior = PastPrior.from_counts(exp.map_batches(daily_counts, batch_format="pandas").to_pandas())
    ft = FeatureTables.from_catalog(cat)
    d = cfg.data
    fin = exp.groupby("ibucket", num_partitions=P).map_groups(item_counters, batch_format="pandas").map_batches(
        finalize, batch_format="pandas",
        fn_kwargs={"ft": ft, "prior": past_prior, "strength": d.ctr_prior_strength, "long_len": d.long_len,
                   "short_len": d.short_len, "n_hard": d.max_hard_negatives},
    ).materialize()
    del exp
    fin.map_batches(ranking_rows, batch_format="pandas", fn_kwargs={"n_hard": d.max_hard_negatives}).write_parquet(
        str(out / "ranking"), partition_cols=["split"]
    )
    fin.map_batches(
        retrieval_rows, batch_format="pandas",
        fn_kwargs={"ft": ft, "n_hard": d.max_hard_negatives, "profile": cat.profile_fields},
    ).write_parquet(str(out / "retrieval"), partition_cols=["split"])
    fin.map_batches(click_rows, batch_format="pandas").write_parquet(str(out / "clicks"))
    summary = combine_summary(fin.map_batches(partial_summary, batch_format="pandas").to_pandas()) | {
        "users": len(fin.unique("user_key")), "items": len(fin.unique("item_key"))}
    reject_sets = (rejected.select_columns(["reason"]),
                   dups.map_batches(_dup_rejects, batch_format="pandas").select_columns(["reason"]))
    reasons = pd.concat(
        [r.groupby("reason").count().to_pandas() for r in reject_sets if r.count()]
        or [pd.DataFrame({"reason": [], "count()": []})]
    ).groupby("reason")["count()"].sum()
    moments = combine_moments(fin.map_batches(numeric_moments, batch_format="pandas").to_pandas())
    return write_meta(out, plan, cat, summary, reasons, n_input, n_acc - n_dup, t_val, t_test, prior, moments)
