"""What the ingest writes: example tables per split, click timelines, catalogue, stats,
feature_spec.json and the rejects — plus the per-batch partial statistics both ingest
paths (Ray Data and single process) combine into the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from configs import FunnelConfig, flatten, to_dict
from pipeline.catalog import Catalog, FeatureTables, write_json
from pipeline.examples import numpy_frame
from pipeline.validate import REJECT_COLUMNS

if TYPE_CHECKING:
    from pipeline.ingest import Plan

SPLITS = ("train", "val", "test")
# past-only user/item signals the retrieval towers (and their AdaF2M2 adapters) read
STATE_AND_COUNTERS = ("user_active_days_7", "user_active_days_30", "user_exposures_before", "user_clicks_before",
                      "user_ctr", "item_exposures_before", "item_clicks_before", "item_ctr", "item_age_days")


# the numeric fields of a ranking row and their transform before standardisation
# (models.spec.numeric_transform): counts log1p, click rates log-odds
NUMERIC_FIELDS: dict[str, str] = {
    "user_active_days_7": "log1p", "user_active_days_30": "log1p", "user_exposures_before": "log1p",
    "user_clicks_before": "log1p", "item_exposures_before": "log1p", "item_clicks_before": "log1p",
    "user_ctr": "logit", "item_ctr": "logit", "item_age_days": "log1p",
}


def numeric_moments(df: pd.DataFrame) -> pd.DataFrame:
    """Per-batch partial moments of the transformed numeric fields over the batch's TRAIN rows
    (one row: n, sum_<f>, sq_<f>); summed over batches by `combine_moments`. Val and test rows
    never move the statistics the models standardise with."""
    from models.spec import numeric_transform

    df = numpy_frame(df)
    train = df["split"].to_numpy() == "train"
    row: dict[str, float] = {"n": float(train.sum())}
    for f, kind in NUMERIC_FIELDS.items():
        x = numeric_transform(df[f].to_numpy()[train], kind)
        row[f"sum_{f}"], row[f"sq_{f}"] = float(x.sum()), float(np.square(x).sum())
    return pd.DataFrame([row])


def combine_moments(parts: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """{field: (mean, std)} of the transformed numeric fields over all train rows."""
    tot = numpy_frame(parts).sum()
    n = max(float(tot["n"]), 1.0)
    out = {}
    for f in NUMERIC_FIELDS:
        mean = float(tot[f"sum_{f}"]) / n
        var = max(float(tot[f"sq_{f}"]) / n - mean * mean, 0.0)
        out[f] = (mean, float(np.sqrt(var)))
    return out


# The version of the feature definitions, part of the dataset fingerprint: the same logs under a
# changed feature definition are another dataset, so the registry gate re-evaluates the champion
# on them instead of comparing numbers computed on different inputs. 2: the past-only CTR prior.
FEATURES_VERSION = 2


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
    digest = f"{int(per['hash_hi'].sum())}:{int(per['hash_lo'].sum())}:{total}:features-v{FEATURES_VERSION}"
    return {"splits": splits, "seq_len_long_quantiles": quant,
            "fingerprint": hashlib.sha256(digest.encode()).hexdigest()[:16]}


def retrieval_rows(df: pd.DataFrame, ft: FeatureTables, n_hard: int, profile: list[str]) -> pa.Table:
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


def ranking_rows(df: pd.DataFrame, n_hard: int) -> pd.DataFrame:
    return df.drop(columns=["n_hard", "click_ts", *[f"hard_neg_{j}" for j in range(n_hard)]])


def write_examples(df: pd.DataFrame, out: str | Path, ft: FeatureTables, n_hard: int, profile: list[str],
                   part: int = 0) -> None:
    """The three example outputs of a frame of finalised rows, as Parquet: ranking/ and retrieval/
    partitioned by split, and clicks/. The file names carry `part`, so the parts of several writers
    land side by side, and a retried part overwrites its own files."""
    import pyarrow.parquet as pq

    out = Path(out)
    name = f"part-{part:05d}-{{i}}.parquet"
    pq.write_to_dataset(pa.Table.from_pandas(ranking_rows(df, n_hard), preserve_index=False), out / "ranking",
                        partition_cols=["split"], basename_template=name)
    pq.write_to_dataset(retrieval_rows(df, ft, n_hard, profile), out / "retrieval", partition_cols=["split"],
                        basename_template=name)
    (out / "clicks").mkdir(parents=True, exist_ok=True)
    click_rows(df).to_parquet(out / "clicks" / f"part-{part:05d}.parquet", index=False)


def click_rows(df: pd.DataFrame) -> pd.DataFrame:
    df = numpy_frame(df)
    c = df[df["label"] == 1]
    return pd.DataFrame({"user_key": c["user_key"].to_numpy(), "click_ts": c["click_ts"].to_numpy(),
                         "item_key": c["item_key"].to_numpy()})


def read_rejects(out: str | Path) -> pd.DataFrame:
    """Every rejected row of a run (all tables), as written under rejects/."""
    files = sorted(Path(out, "rejects").rglob("*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in REJECT_COLUMNS})
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


MARKER = ".funnel-output"


def check_output(cfg: FunnelConfig) -> Path:
    """The output folder, if Funnel may (re)write it: never one that is, or holds, the input,
    and never an existing folder Funnel did not write (no MARKER in it) — ingest replaces the
    whole folder, and must not delete anything else. A clear error otherwise."""
    out = Path(cfg.data.output).resolve()
    if cfg.data.input:
        src = Path(cfg.data.input).resolve()
        if src == out or src.is_relative_to(out):
            raise ValueError(f"data.output {out} {'is' if src == out else 'contains'} the input {src}: ingest "
                             "replaces its output folder; choose an output outside the input")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _ours(out))):
        raise ValueError(f"data.output {out} exists and was not written by Funnel (no {MARKER} in it); "
                         "choose another output folder, or remove it yourself")
    return out


def _ours(out: Path) -> bool:
    """Funnel's marker, or the two files every earlier Funnel ingest wrote (before the marker)."""
    return (out / MARKER).exists() or ((out / "stats.json").exists() and (out / "feature_spec.json").exists())


@contextlib.contextmanager
def output_folder(cfg: FunnelConfig):
    """Yields a fresh temporary folder beside the output; on success it is renamed into place
    (the previous output, Funnel's own, goes only after that), on failure it is removed and
    the previous output stays as it was."""
    out = check_output(cfg)
    tmp = out.parent / f".{out.name}.incoming-{uuid.uuid4().hex[:8]}"
    (tmp / "rejects").mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / MARKER).write_text("written by Funnel's ingest (pipeline/ingest.py); the next ingest replaces "
                              "this folder\n")
    old = out.parent / f".{out.name}.previous-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_meta(out: Path, plan: Plan, cat: Catalog, summary: dict[str, Any], reasons: pd.Series,
                n_input: int, n_accepted: int, t_val: int, t_test: int, prior: float,
                moments: dict[str, tuple[float, float]]) -> dict[str, Any]:
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
    write_json(out / "feature_spec.json", feature_spec(cat, cfg, summary["fingerprint"], moments, prior))
    write_json(out / "config.json", flatten(to_dict(cfg)))
    return stats


def feature_spec(cat: Catalog, cfg: FunnelConfig, fp: str, moments: dict[str, tuple[float, float]],
                 label_rate: float) -> dict[str, Any]:
    d = cfg.data
    vs = cat.vocab_sizes
    cat_fields = {f: {"type": "categorical", "vocab_size": vs[f], "dtype": "int32"}
                  for f in ("user_idx", "item_idx", "cat_idx", "brand_idx", *cat.profile_fields)}
    cat_fields.update({
        "position": {"type": "categorical", "vocab_size": int(cfg.world.slate_size) + 2 if d.source == "simulator" else 256, "dtype": "int32", "note": "slate position + 1; 0 unknown"},
        "hour": {"type": "categorical", "vocab_size": 24, "dtype": "int32", "padding": False},
        "dow": {"type": "categorical", "vocab_size": 7, "dtype": "int32", "padding": False},
    })
    numeric = {f: {"type": "numeric", "dtype": "float32" if t == "logit" else "int32", "transform": t,
                   "mean": moments[f][0], "std": moments[f][1]} for f, t in NUMERIC_FIELDS.items()}
    numeric["item_age_days"] |= {"dtype": "float32", "note": "-1 unknown"}
    return {
        "fingerprint": fp,
        "label": "label",
        "label_rate": label_rate,
        "numeric_standardisation": "z = (transform(x) - mean) / std, mean/std over the train split's rows",
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
