"""The catalogue side of ingest (driver-side, catalogue-sized): items, users, vocabularies.

Dense keys address every item and user the run knows (1..N; 0 = padding);
vocabulary ids (`*_idx`) are what embeddings see: train-period values seen
`min_count` times, everything else OOV (pipeline/vocab.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.examples import PastPrior, numpy_frame
from pipeline.features import COUNTERS, ranking_features
from pipeline.vocab import Vocab, encode_titles, tokenize

ITEM_FIELDS = ("item_idx", "cat_idx", "brand_idx")
_PROFILE_SKIP = {"user_id", "registered_ts", "reject_reason"}


@dataclass
class Catalog:
    items: pd.DataFrame  # item_key, item_id, item_idx, cat_idx, brand_idx, title, title_tokens, first_seen_ts, ...
    users: pd.DataFrame  # user_key, user_id, user_idx, u_<profile>_idx ...
    item_index: pd.Index  # raw item id -> key - 1
    user_index: pd.Index
    vocabs: dict[str, list]
    profile_fields: list[str]
    title_len: int
    vocab_sizes: dict[str, int]

    def item_keys(self, raw) -> np.ndarray:
        return self.item_index.get_indexer(pd.Index(raw)) + 1  # 0 where unknown

    def user_keys(self, raw) -> np.ndarray:
        return self.user_index.get_indexer(pd.Index(raw)) + 1

    def weights_by_key(self, counts: pd.Series) -> np.ndarray:
        w = np.zeros(len(self.items) + 1)
        keys = self.item_keys(counts.index)
        ok = keys > 0
        w[keys[ok]] = counts.to_numpy()[ok]
        return w


@dataclass
class BaseVocabs:
    """An earlier ingest's keys and vocabularies (data.vocab_from), for `build_catalog` to extend."""

    item_keys: pd.Index  # item ids in key order (key = position + 1)
    user_keys: pd.Index
    vocabs: dict[str, pd.Index]  # "item", "user", "category", "brand", "title_word", "user.<c>": values in id order

    @classmethod
    def load(cls, root: str | Path) -> BaseVocabs:
        root = Path(root)
        missing = [f for f in ("items.parquet", "users.parquet", "vocab.json") if not (root / f).exists()]
        if missing:
            raise FileNotFoundError(f"data.vocab_from={root}: not an ingest output (no {', '.join(missing)})")
        items = pd.read_parquet(root / "items.parquet", columns=["item_key", "item_id", "item_idx"])
        users = pd.read_parquet(root / "users.parquet", columns=["user_key", "user_id", "user_idx"])

        def by_idx(frame: pd.DataFrame, col: str, idx: str) -> pd.Index:
            known = frame[frame[idx] >= 2].sort_values(idx)
            return pd.Index(known[col].to_numpy())

        vocabs = {k: pd.Index(v) for k, v in json.loads((root / "vocab.json").read_text()).items()}
        return cls(pd.Index(items.sort_values("item_key")["item_id"].to_numpy()),
                   pd.Index(users.sort_values("user_key")["user_id"].to_numpy()),
                   vocabs | {"item": by_idx(items, "item_id", "item_idx"), "user": by_idx(users, "user_id", "user_idx")})


def _base_order(frame: pd.DataFrame, col: str, base: pd.Index | None) -> pd.DataFrame:
    """The rows in base's key order first (their keys stay), then the others in their order."""
    frame = frame.reset_index(drop=True)
    if base is None:
        return frame.copy()
    pos = base.get_indexer(pd.Index(frame[col]))
    gone = len(base) - int((pos >= 0).sum())
    if gone:
        raise ValueError(f"data.vocab_from: {gone} {col}s of the earlier ingest are missing from this one; "
                         "its keys cannot be kept (extend only an ingest of the same catalogue and users)")
    order = np.lexsort((np.arange(len(frame)), np.where(pos >= 0, pos, len(base))))
    return frame.iloc[order].reset_index(drop=True).copy()


def build_catalog(
    items: pd.DataFrame,
    users: pd.DataFrame,
    event_item_ids: np.ndarray,
    event_user_ids: np.ndarray,
    item_counts: pd.Series,
    user_counts: pd.Series,
    min_count: int,
    title_len: int,
    base: BaseVocabs | None = None,
) -> Catalog:
    """Keys over catalogue ∪ log ids; vocabularies from train-period counts. With `base` (an earlier
    ingest's, data.vocab_from) the keys and vocabulary ids it had stay, new ones come after
    (pipeline/vocab.py)."""
    extra_items = pd.Index(event_item_ids).difference(pd.Index(items["item_id"]))
    if len(extra_items):  # only possible when item metadata is not required
        items = pd.concat(
            [items, pd.DataFrame({"item_id": extra_items, "category": "unknown", "brand": "unknown", "title": "", "first_seen_ts": -1})],
            ignore_index=True,
        )
    items = _base_order(items, "item_id", base.item_keys if base else None)
    items.insert(0, "item_key", np.arange(1, len(items) + 1, dtype=np.int64))
    b = base.vocabs if base else {}
    item_vocab = Vocab.from_counts(item_counts, min_count, b.get("item"))
    items["item_idx"] = item_vocab.lookup(items["item_id"])
    cat_vocab = Vocab.from_values(items["category"].astype(str), b.get("category"))
    brand_vocab = Vocab.from_values(items["brand"].astype(str), b.get("brand"))
    items["cat_idx"] = cat_vocab.lookup(items["category"].astype(str))
    items["brand_idx"] = brand_vocab.lookup(items["brand"].astype(str))
    toks = tokenize(items["title"].fillna(""))
    word_counts = pd.Series([w for t in toks for w in t], dtype=object).value_counts()
    word_vocab = Vocab.from_counts(word_counts, 1, b.get("title_word"))
    items["title_tokens"] = list(encode_titles(toks, word_vocab, title_len))
    items["first_seen_ts"] = pd.to_numeric(items["first_seen_ts"], errors="coerce").fillna(-1).astype(np.int64)

    extra_users = pd.Index(event_user_ids).difference(pd.Index(users["user_id"]))
    if len(extra_users):
        users = pd.concat([users, pd.DataFrame({"user_id": extra_users})], ignore_index=True)
    users = _base_order(users, "user_id", base.user_keys if base else None)
    users.insert(0, "user_key", np.arange(1, len(users) + 1, dtype=np.int64))
    user_vocab = Vocab.from_counts(user_counts, min_count, b.get("user"))
    users["user_idx"] = user_vocab.lookup(users["user_id"])
    profile = [c for c in users.columns if c not in _PROFILE_SKIP | {"user_key", "user_idx"}]
    vocabs = {"category": cat_vocab.to_list(), "brand": brand_vocab.to_list(), "title_word": word_vocab.to_list()}
    for c in profile:
        v = Vocab.from_values(users[c].astype(str), b.get(f"user.{c}"))
        users[f"u_{c}_idx"] = v.lookup(users[c].astype(str))
        vocabs[f"user.{c}"] = v.to_list()
    return Catalog(
        items=items,
        users=users,
        item_index=pd.Index(items["item_id"]),
        user_index=pd.Index(users["user_id"]),
        vocabs=vocabs,
        profile_fields=[f"u_{c}_idx" for c in profile],
        title_len=title_len,
        vocab_sizes={
            "item_idx": item_vocab.size,
            "user_idx": user_vocab.size,
            "cat_idx": cat_vocab.size,
            "brand_idx": brand_vocab.size,
            "title_word": word_vocab.size,
            **{f"u_{c}_idx": len(vocabs[f"user.{c}"]) + 2 for c in profile},
        },
    )


@dataclass
class FeatureTables:
    """Key-indexed arrays that `finalize` needs on workers (small, shipped once)."""

    item_idx: np.ndarray
    cat_idx: np.ndarray
    brand_idx: np.ndarray
    first_seen: np.ndarray
    title_tokens: np.ndarray  # (n_items + 1, title_len)
    user_idx: np.ndarray
    profile: dict[str, np.ndarray]

    @classmethod
    def from_catalog(cls, cat: Catalog) -> FeatureTables:
        tt = np.zeros((len(cat.items) + 1, cat.title_len), dtype=np.int32)
        tt[cat.items["item_key"].to_numpy()] = np.stack(cat.items["title_tokens"].to_numpy()) if len(cat.items) else 0
        return cls.from_frames(cat.items, cat.users, cat.profile_fields, tt)

    @classmethod
    def from_frames(cls, items: pd.DataFrame, users: pd.DataFrame, profile_fields: list[str],
                    title_tokens: np.ndarray | None = None) -> FeatureTables:
        """From the catalogue frames (as the ingest writes items.parquet and users.parquet)."""
        def by_key(frame: pd.DataFrame, key: str, col: str, dtype=np.int32) -> np.ndarray:
            out = np.zeros(int(frame[key].max()) + 1 if len(frame) else 1, dtype=dtype)
            out[frame[key].to_numpy()] = frame[col].to_numpy()
            return out

        if title_tokens is None:
            title_tokens = np.zeros((int(items["item_key"].max()) + 1, 0), dtype=np.int32)
        return cls(
            item_idx=by_key(items, "item_key", "item_idx"),
            cat_idx=by_key(items, "item_key", "cat_idx"),
            brand_idx=by_key(items, "item_key", "brand_idx"),
            first_seen=by_key(items, "item_key", "first_seen_ts", np.int64),
            title_tokens=title_tokens,
            user_idx=by_key(users, "user_key", "user_idx"),
            profile={f: by_key(users, "user_key", f) for f in profile_fields},
        )

    def serving(self) -> FeatureTables:
        """The tables for keys the log may not have: key 0 (an unknown user or item at serving time; the
        ingest never writes it) reads as OOV (1) in every id table and as an unknown release time."""
        def oov(a: np.ndarray) -> np.ndarray:
            a = a.copy()
            a[0] = 1
            return a

        fs = self.first_seen.copy()
        fs[0] = -1
        return FeatureTables(oov(self.item_idx), oov(self.cat_idx), oov(self.brand_idx), fs, self.title_tokens,
                             oov(self.user_idx), {f: oov(v) for f, v in self.profile.items()})


RANKING_COLUMNS = [
    "label", "ts", "request_id", "user_key", "item_key", "user_idx", "item_idx", "cat_idx", "brand_idx",
    "position", "hour", "dow", "hist_end", "seq_len_long", "seq_len_short",
    "user_active_days_7", "user_active_days_30", "user_exposures_before", "user_clicks_before", "user_ctr",
    "item_exposures_before", "item_clicks_before", "item_ctr", "item_age_days", "is_sampled_negative",
]  # + profile fields + split


def finalize(df: pd.DataFrame, ft: FeatureTables, prior: PastPrior, strength: float, long_len: int, short_len: int,
             n_hard: int) -> pd.DataFrame:
    """Exposure rows with counters → the ranking-example schema: the features of
    `pipeline.features.ranking_features` (the definition serving calls too), the CTRs smoothed towards
    the past-only prior of each row's day (`PastPrior`), plus the label and the bookkeeping columns."""
    df = numpy_frame(df)
    ts = df["ts"].to_numpy().astype(np.int64)
    feats = ranking_features(df["user_key"].to_numpy(), df["item_key"].to_numpy(), ts, df["position"].to_numpy(),
                             {c: df[c].to_numpy() for c in COUNTERS}, prior.at(ts), ft, strength, long_len, short_len)
    out = pd.DataFrame(
        {
            "label": df["label"].to_numpy().astype(np.int8),
            "ts": ts,
            "request_id": df["request_id"].to_numpy().astype(np.int64),
            "user_key": df["user_key"].to_numpy().astype(np.int64),
            "item_key": df["item_key"].to_numpy().astype(np.int64),
            **{c: v for c, v in feats.items() if c not in ft.profile},
            "is_sampled_negative": (df["event"].to_numpy() == "sampled_negative").astype(np.int8),
            **{c: feats[c] for c in ft.profile},
        }
    )
    out["split"] = df["split"].to_numpy()
    out["click_ts"] = df["click_ts"].to_numpy().astype(np.int64)  # label time: feeds clicks/, never a feature
    hard = np.stack([df[f"hard_neg_{j}"].to_numpy() for j in range(n_hard)], axis=1) if n_hard else np.zeros((len(df), 0))
    out["n_hard"] = (hard > 0).sum(axis=1).astype(np.int32)
    for j in range(n_hard):
        out[f"hard_neg_{j}"] = hard[:, j].astype(np.int64)
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(type(o))
