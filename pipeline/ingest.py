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
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from configs import FunnelConfig, flatten, to_dict
from pipeline.catalog import Catalog, FeatureTables, build_catalog, finalize, write_json
from pipeline.examples import ExampleContext, annotate_user_events, assign_split, item_counters, numpy_frame
from pipeline.readers import RawTables
from pipeline.validate import (
    CORE_EVENT_KINDS,
    REJECT_COLUMNS,
    EventRules,
    rejects_frame,
    table_rejects,
    validate_events,
    validate_table,
)

SPLITS = ("train", "val", "test")
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


def _counts(df: pd.DataFrame, col: str) -> pd.Series:
    return df[col].value_counts()


def _catalog(plan: Plan, train_events: pd.DataFrame, item_ids, user_ids) -> Catalog:
    exp = train_events[train_events["event"].isin(EXPOSURE_KINDS)]
    return build_catalog(
        plan.items, plan.users, item_ids, user_ids,
        _counts(exp, "item_id"), _counts(exp, "user_id"),
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


def _retrieval(df: pd.DataFrame, ft: FeatureTables, n_hard: int, profile: list[str]) -> pa.Table:
    """Click rows → retrieval examples; `hard_negs` and `target_title` as plain Arrow list
    columns (portable Parquet, not Ray's tensor extension type)."""
    df = numpy_frame(df)
    c = df[df["label"] == 1]
    cols = ["ts", "request_id", "user_key", "user_idx", "item_key", "item_idx", "cat_idx", "brand_idx",
            "hist_end", "seq_len_long", "seq_len_short", "n_hard", *profile, "split"]
    table = pa.Table.from_pandas(c[cols].reset_index(drop=True), preserve_index=False)
    hard = np.stack([c[f"hard_neg_{j}"].to_numpy(np.int64) for j in range(n_hard)], 1) if n_hard else np.zeros((len(c), 0), np.int64)
    title = ft.title_tokens[c["item_key"].to_numpy()].astype(np.int32)
    table = table.append_column("hard_negs", pa.FixedSizeListArray.from_arrays(pa.array(hard.ravel()), n_hard))
    return table.append_column("target_title", pa.FixedSizeListArray.from_arrays(pa.array(title.ravel()), title.shape[1]))


def _ranking(df: pd.DataFrame, n_hard: int) -> pd.DataFrame:
    return df.drop(columns=["n_hard", "click_ts", *[f"hard_neg_{j}" for j in range(n_hard)]])


def _clicks(df: pd.DataFrame) -> pd.DataFrame:
    df = numpy_frame(df)
    c = df[df["label"] == 1]
    return pd.DataFrame({"user_key": c["user_key"].to_numpy(), "click_ts": c["click_ts"].to_numpy(),
                         "item_key": c["item_key"].to_numpy()})


# --------------------------------------------------------------------------- single process


def run_ingest_local(cfg: FunnelConfig, raw_events: pd.DataFrame, raw: RawTables) -> dict[str, Any]:
    """The whole ingest in one process with pandas (same transforms, no Ray)."""
    out = _prepare_output(cfg)
    plan = make_plan(cfg, raw)
    v = validate_events(raw_events, plan.rules, pd.Index(plan.items["item_id"]))
    rejected = rejects_frame(v, "events")
    acc = v[v["reject_reason"] == ""].drop(columns="reject_reason")
    t_val, t_test = split_times(int(acc["ts"].min()), int(acc["ts"].max()), cfg.data.val_frac, cfg.data.test_frac)
    train = acc[acc["ts"] < t_val]
    cat = _catalog(plan, train, acc["item_id"].unique(), acc["user_id"].unique())
    ctx = _context(plan, cat, _counts(train[train["event"] == "click"], "item_id"))
    keyed = _keyed(acc, cat.item_index, cat.user_index, 1)
    p1 = annotate_user_events(keyed, ctx)
    dups = _dup_rejects(p1)
    exp = _split_and_bucket(p1, t_val, t_test, 1)
    prior = float(exp.loc[exp["split"] == "train", "label"].mean()) if (exp["split"] == "train").any() else 0.05
    p2 = item_counters(exp)
    ft = FeatureTables.from_catalog(cat)
    d = cfg.data
    fin = finalize(p2, ft, prior, d.ctr_prior_strength, d.long_len, d.short_len, d.max_hard_negatives)
    fin = fin.sort_values(["ts", "user_key", "item_key", "request_id"], kind="stable").reset_index(drop=True)
    _ranking(fin, d.max_hard_negatives).to_parquet(out / "ranking", partition_cols=["split"], index=False)
    pq.write_to_dataset(_retrieval(fin, ft, d.max_hard_negatives, cat.profile_fields), out / "retrieval",
                        partition_cols=["split"])
    (out / "clicks").mkdir()
    _clicks(fin).to_parquet(out / "clicks" / "part-0.parquet", index=False)
    all_rejects = pd.concat([rejected, dups], ignore_index=True)
    all_rejects.to_parquet(out / "rejects" / "events.parquet", index=False)
    return _write_meta(out, plan, cat, fin, all_rejects, len(raw_events), len(acc) - len(dups), t_val, t_test, prior)


# --------------------------------------------------------------------------- Ray Data


def run_ingest(cfg: FunnelConfig, raw: RawTables | None = None) -> dict[str, Any]:
    """The ingest on Ray Data (local cluster or a real one); returns the stats dict."""
    import ray
    from ray.data import DataContext
    from ray.data.expressions import col

    from pipeline.readers import read_source

    ctx_ray = DataContext.get_current()
    ctx_ray.enable_progress_bars = cfg.data.progress
    out = _prepare_output(cfg)
    raw = raw or read_source(cfg)
    plan = make_plan(cfg, raw)
    P = max(1, cfg.data.num_partitions)
    known = pd.Index(plan.items["item_id"])
    rules = plan.rules

    validated = raw.events.map_batches(
        validate_events, batch_format="pandas", fn_kwargs={"rules": rules, "known_items": known}
    ).materialize()
    n_input = validated.count()
    validated.filter(expr=col("reject_reason") != "").map_batches(
        rejects_frame, batch_format="pandas", fn_kwargs={"table": "events"}
    ).write_parquet(str(out / "rejects" / "events"))
    acc = validated.filter(expr=col("reject_reason") == "").drop_columns(["reject_reason"]).materialize()
    n_acc = acc.count()
    if n_acc == 0:
        raise ValueError("no event passed validation; see rejects/ for why")
    t_val, t_test = split_times(int(acc.min("ts")), int(acc.max("ts")), cfg.data.val_frac, cfg.data.test_frac)
    train_exp = acc.filter(
        expr=(col("ts") < t_val) & col("event").is_in(list(EXPOSURE_KINDS))
    ).select_columns(["item_id", "user_id", "event"]).to_pandas()
    ids = acc.select_columns(["item_id", "user_id"]).to_pandas()
    cat = _catalog(plan, train_exp, ids["item_id"].unique(), ids["user_id"].unique())
    del ids
    ex_ctx = _context(plan, cat, _counts(train_exp[train_exp["event"] == "click"], "item_id"))
    del train_exp

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
    prior = float(train_n.mean("label")) if train_n.count() else 0.05
    ft = FeatureTables.from_catalog(cat)
    d = cfg.data
    fin = exp.groupby("ibucket", num_partitions=P).map_groups(item_counters, batch_format="pandas").map_batches(
        finalize, batch_format="pandas",
        fn_kwargs={"ft": ft, "prior": prior, "strength": d.ctr_prior_strength, "long_len": d.long_len,
                   "short_len": d.short_len, "n_hard": d.max_hard_negatives},
    ).materialize()
    del exp
    fin.map_batches(_ranking, batch_format="pandas", fn_kwargs={"n_hard": d.max_hard_negatives}).write_parquet(
        str(out / "ranking"), partition_cols=["split"]
    )
    fin.map_batches(
        _retrieval, batch_format="pandas",
        fn_kwargs={"ft": ft, "n_hard": d.max_hard_negatives, "profile": cat.profile_fields},
    ).write_parquet(str(out / "retrieval"), partition_cols=["split"])
    fin.map_batches(_clicks, batch_format="pandas").write_parquet(str(out / "clicks"))
    summary = fin.select_columns(["split", "label", "seq_len_long", "ts", "user_key", "item_key"]).to_pandas()
    rejects = read_rejects(out)
    ray.data.DataContext.get_current().enable_progress_bars = True
    return _write_meta(out, plan, cat, summary, rejects, n_input, n_acc - n_dup, t_val, t_test, prior)


# --------------------------------------------------------------------------- outputs


def read_rejects(out: str | Path) -> pd.DataFrame:
    """Every rejected row of a run (all tables), as written under rejects/."""
    files = sorted(Path(out, "rejects").rglob("*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in REJECT_COLUMNS})
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _prepare_output(cfg: FunnelConfig) -> Path:
    import shutil

    out = Path(cfg.data.output)
    if out.exists():
        shutil.rmtree(out)
    (out / "rejects").mkdir(parents=True)
    return out


def fingerprint(frame: pd.DataFrame) -> str:
    """Order-independent content hash of the examples (a sum of row hashes)."""
    cols = sorted(c for c in ("split", "label", "ts", "user_key", "item_key", "seq_len_long") if c in frame)
    h = pd.util.hash_pandas_object(frame[cols], index=False).to_numpy().sum(dtype=np.uint64)
    return hashlib.sha256(f"{int(h)}:{len(frame)}".encode()).hexdigest()[:16]


def _write_meta(out: Path, plan: Plan, cat: Catalog, examples: pd.DataFrame, rejects: pd.DataFrame,
                n_input: int, n_accepted: int, t_val: int, t_test: int, prior: float) -> dict[str, Any]:
    cfg = plan.cfg
    items = cat.items.copy()
    items["title_tokens"] = [list(map(int, t)) for t in items["title_tokens"]]
    items.astype({c: str for c in items.columns if items[c].dtype == object and c != "title_tokens"}).to_parquet(
        out / "items.parquet", index=False)
    cat.users.astype({c: str for c in cat.users.columns if cat.users[c].dtype == object}).to_parquet(
        out / "users.parquet", index=False)
    if len(plan.catalog_rejects):
        plan.catalog_rejects.to_parquet(out / "rejects" / "catalog.parquet", index=False)
    write_json(out / "vocab.json", cat.vocabs)
    ev_rej = rejects[rejects["table"] == "events"]
    by_reason = ev_rej["reason"].value_counts().sort_index().to_dict()
    per_split = {}
    for s in SPLITS:
        part = examples[examples["split"] == s]
        per_split[s] = {
            "ranking_rows": len(part),
            "retrieval_rows": int((part["label"] == 1).sum()),
            "positive_rate": float(part["label"].mean()) if len(part) else 0.0,
        }
    sl = examples["seq_len_long"]
    fp = fingerprint(examples)
    stats = {
        "source": plan.source,
        "input_rows": {"events": int(n_input), **plan.input_counts},
        "accepted_events": int(n_accepted),
        "rejected_events": len(ev_rej),
        "rejects_by_reason": {k: int(v) for k, v in by_reason.items()},
        "catalog_rejects": plan.catalog_rejects["reason"].value_counts().to_dict() if len(plan.catalog_rejects) else {},
        "splits": per_split,
        "split_times": {"val_start": t_val, "test_start": t_test},
        "train_ctr_prior": prior,
        "seq_len_long_quantiles": {str(q): float(sl.quantile(q)) for q in (0.1, 0.5, 0.9, 0.99)} if len(sl) else {},
        "users": int(examples["user_key"].nunique()),
        "items": int(examples["item_key"].nunique()),
        "has_impressions": plan.has_impressions,
        "fingerprint": fp,
    }
    assert stats["input_rows"]["events"] == stats["accepted_events"] + stats["rejected_events"], stats
    write_json(out / "stats.json", stats)
    write_json(out / "feature_spec.json", feature_spec(cat, cfg, fp))
    write_json(out / "config.json", flatten(to_dict(cfg)))
    return stats


def feature_spec(cat: Catalog, cfg: FunnelConfig, fp: str) -> dict[str, Any]:
    d = cfg.data
    vs = cat.vocab_sizes
    cat_fields = {f: {"type": "categorical", "vocab_size": vs[f], "dtype": "int32"}
                  for f in ("user_idx", "item_idx", "cat_idx", "brand_idx", *cat.profile_fields)}
    cat_fields.update({
        "position": {"type": "categorical", "vocab_size": int(cfg.world.slate_size) + 2 if d.source == "simulator" else 256, "dtype": "int32", "note": "slate position + 1; 0 unknown"},
        "hour": {"type": "categorical", "vocab_size": 24, "dtype": "int32"},
        "dow": {"type": "categorical", "vocab_size": 7, "dtype": "int32"},
    })
    numeric = {f: {"type": "numeric", "dtype": "int32", "transform": "log1p"} for f in (
        "user_active_days_7", "user_active_days_30", "user_exposures_before", "user_clicks_before",
        "item_exposures_before", "item_clicks_before")}
    numeric.update({f: {"type": "numeric", "dtype": "float32", "transform": "none"} for f in ("user_ctr", "item_ctr")})
    numeric["item_age_days"] = {"type": "numeric", "dtype": "float32", "transform": "log1p", "note": "-1 unknown"}
    return {
        "fingerprint": fp,
        "label": "label",
        "categorical": cat_fields,
        "numeric": numeric,
        "state_signals": ["user_active_days_7", "user_active_days_30", "user_clicks_before", "item_clicks_before"],
        "sequences": {
            "storage": "timeline",
            "note": "history = the user's clicks [hist_end - L, hist_end) from clicks/, gathered with pipeline.history.HistoryStore; all strictly before ts",
            "long_len": d.long_len,
            "short_len": d.short_len,
            "fields": {"item_idx": vs["item_idx"], "cat_idx": vs["cat_idx"], "brand_idx": vs["brand_idx"]},
            "length_columns": {"long": "seq_len_long", "short": "seq_len_short"},
        },
        "retrieval": {"hard_negatives": d.max_hard_negatives, "title_len": d.title_len,
                      "title_vocab_size": vs["title_word"], "num_item_keys": len(cat.items) + 1},
        "keys": {"user_key": "dense over all users (0 pad)", "item_key": "dense over the item table (0 pad)"},
        "vocab": {"pad": 0, "oov": 1, "min_count": d.min_count, "built_from": "train split"},
    }
