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
# past-only user/item signals the retrieval towers (and their AdaF2M2 adapters) read
STATE_AND_COUNTERS = ("user_active_days_7", "user_active_days_30", "user_exposures_before", "user_clicks_before",
                      "user_ctr", "item_exposures_before", "item_clicks_before", "item_ctr", "item_age_days")
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


def partial_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per-batch partial statistics of the examples, combined by `combine_summary`:
    rows and positives per (split, history length), and an order-independent hash."""
    df = numpy_frame(df)
    cols = ["split", "label", "ts", "user_key", "item_key", "seq_len_long"]
    h = pd.util.hash_pandas_object(df[cols], index=False).to_numpy()
    g = pd.DataFrame({"split": df["split"].to_numpy(), "seq_len_long": df["seq_len_long"].to_numpy(),
                      "rows": 1, "positives": df["label"].to_numpy().astype(np.int64),
                      "hash_hi": (h >> np.uint64(32)).astype(np.int64), "hash_lo": (h & np.uint64(0xFFFFFFFF)).astype(np.int64)})
    return g.groupby(["split", "seq_len_long"], as_index=False).sum()


def combine_summary(parts: pd.DataFrame) -> dict[str, Any]:
    parts = numpy_frame(parts)
    per = parts.groupby(["split", "seq_len_long"], as_index=False)[["rows", "positives", "hash_hi", "hash_lo"]].sum()
    splits = {}
    for s in SPLITS:
        p = per[per["split"] == s]
        n, pos = int(p["rows"].sum()), int(p["positives"].sum())
        splits[s] = {"ranking_rows": n, "retrieval_rows": pos, "positive_rate": pos / n if n else 0.0}
    hist = per.groupby("seq_len_long")["rows"].sum().sort_index()
    cdf = hist.cumsum() / max(hist.sum(), 1)
    quant = {str(q): float(hist.index[np.searchsorted(cdf.to_numpy(), q)]) for q in (0.1, 0.5, 0.9, 0.99)} if len(hist) else {}
    total = int(per["rows"].sum())
    digest = f"{int(per['hash_hi'].sum())}:{int(per['hash_lo'].sum())}:{total}"
    return {"splits": splits, "seq_len_long_quantiles": quant,
            "fingerprint": hashlib.sha256(digest.encode()).hexdigest()[:16]}


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
            "hist_end", "seq_len_long", "seq_len_short", "n_hard", *profile, *STATE_AND_COUNTERS, "split"]
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
    items_n, users_n = id_counts(acc, "item_id", t_val).set_index("item_id"), id_counts(acc, "user_id", t_val).set_index("user_id")
    cat = _catalog(plan, items_n, users_n)
    ctx = _context(plan, cat, items_n["train_click"])
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
    summary = combine_summary(partial_summary(fin)) | {
        "users": int(fin["user_key"].nunique()), "items": int(fin["item_key"].nunique())}
    return _write_meta(out, plan, cat, summary, all_rejects["reason"].value_counts(), len(raw_events),
                       len(acc) - len(dups), t_val, t_test, prior)


# --------------------------------------------------------------------------- Ray Data


def run_ingest(cfg: FunnelConfig, raw: RawTables | None = None) -> dict[str, Any]:
    """The ingest on Ray Data (local cluster or a real one); returns the stats dict."""
    from ray.data import DataContext
    from ray.data.expressions import col

    from pipeline.readers import read_source

    ctx_ray = DataContext.get_current()
    ctx_ray.enable_progress_bars = cfg.data.progress
    ctx_ray.shuffle_strategy = cfg.data.shuffle_strategy
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
    summary = combine_summary(fin.map_batches(partial_summary, batch_format="pandas").to_pandas()) | {
        "users": len(fin.unique("user_key")), "items": len(fin.unique("item_key"))}
    reject_sets = (rejected.select_columns(["reason"]),
                   dups.map_batches(_dup_rejects, batch_format="pandas").select_columns(["reason"]))
    reasons = pd.concat(
        [r.groupby("reason").count().to_pandas() for r in reject_sets if r.count()]
        or [pd.DataFrame({"reason": [], "count()": []})]
    ).groupby("reason")["count()"].sum()
    return _write_meta(out, plan, cat, summary, reasons, n_input, n_acc - n_dup, t_val, t_test, prior)


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


def _write_meta(out: Path, plan: Plan, cat: Catalog, summary: dict[str, Any], reasons: pd.Series,
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
    stats = {
        "source": plan.source,
        "input_rows": {"events": int(n_input), **plan.input_counts},
        "accepted_events": int(n_accepted),
        "rejected_events": int(reasons.sum()),
        "rejects_by_reason": {str(k): int(v) for k, v in reasons.sort_index().items()},
        "catalog_rejects": plan.catalog_rejects["reason"].value_counts().to_dict() if len(plan.catalog_rejects) else {},
        "split_times": {"val_start": t_val, "test_start": t_test},
        "train_ctr_prior": prior,
        "has_impressions": plan.has_impressions,
        **summary,
    }
    if stats["input_rows"]["events"] != stats["accepted_events"] + stats["rejected_events"]:
        raise RuntimeError(f"rows lost: input {n_input} != accepted {n_accepted} + rejected {stats['rejected_events']}")
    write_json(out / "stats.json", stats)
    write_json(out / "feature_spec.json", feature_spec(cat, cfg, summary["fingerprint"]))
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
