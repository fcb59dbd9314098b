"""The batch contract between the pipeline and the models.

A ranking batch is a dict of tensors (B = batch size, L = long sequence length):

  categorical fields   (B,)   int64   one per `FeatureSpec.categorical` (user_idx, item_idx, cat_idx,
                                       brand_idx, profile ids, position, hour, dow); 0 = padding, 1 = OOV
  numeric fields       (B,)   float32 one per `FeatureSpec.numeric` (past-only counters, CTRs, state), raw;
                                       the model's field embedding transforms them (`numeric_transform`:
                                       log1p for counts, log-odds for rates) and standardises them with
                                       the train split's statistics (`FeatureSpec.numeric_stats`)
  hist_item_idx, hist_cat_idx, hist_brand_idx
                       (B, L) int64   the user's clicks strictly before ts, left-padded with 0,
                                       most recent last (pipeline.history.HistoryStore.gather)
  hist_len             (B,)   int64   valid positions, min(hist_end, L)
  hist_age_idx         (B, L) int64   each behavior's age at the row's ts, log2-hour buckets
                                       (behavior_age_bucket below: 0 pad, 1 unknown);
                                       read only by models built with `behavior_age`
  label                (B,)   float32

`FeatureSpec.from_json` reads the pipeline's feature_spec.json; `FeatureSpec.tiny`
is the small spec the unit tests use. The spec is plain data: no torch, no I/O
beyond reading that file.

Numeric inputs (DESIGN.md "Numeric features reach the models standardised"): x' = log1p(max(x, 0))
for counts, logit(clip(x)) for rates, x otherwise; then (x' − mean) / std with the mean and std
of x' over the train split's rows, computed by the ingest (`numeric_moments`) and written in
feature_spec.json, so training and serving transform alike. Categorical fields whose 0 is a
value, not padding (hour 0, Monday), are listed in `unpadded`: their embedding has no frozen
padding row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ITEM_FIELDS = ("item_idx", "cat_idx", "brand_idx")  # the target item; behaviors carry the same three
SEQ_FIELDS = tuple(f"hist_{f}" for f in ITEM_FIELDS)
TRANSFORMS = ("log1p", "logit", "none")
RATE_EPS = 1e-4  # rates are clipped to [eps, 1 − eps] before the log-odds
UNPADDED = ("hour", "dow")  # 0 is a value (midnight, Monday), not padding


def numeric_transform(x: np.ndarray, kind: str) -> np.ndarray:
    """The per-field transform before standardisation (NumPy; `FieldEmbedding.numeric` is the
    same formula in torch, and a unit test holds the two equal)."""
    x = np.asarray(x, dtype=np.float64)
    if kind == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    if kind == "logit":
        p = np.clip(x, RATE_EPS, 1.0 - RATE_EPS)
        return np.log(p / (1.0 - p))
    if kind == "none":
        return x
    raise ValueError(f"unknown numeric transform {kind!r}; known: {TRANSFORMS}")


AGE_BUCKETS = 14  # 0 padding, 1 unknown age, 2 + floor(log2(1 + hours)) capped: 2 = under 1 h … 13 = ≥ 85 days


def behavior_age_bucket(ts: np.ndarray, click_ts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B, L) int64: each behavior's age at its row's request time `ts` (B,), bucketed on a log2 scale of
    hours — 2 + floor(log2(1 + hours)), capped at AGE_BUCKETS − 1; 1 where the click time is unknown
    (0, e.g. a history a request sent without times); 0 at padding (`valid` False). The one definition
    of the feature: training (training.batches) and serving (serving.features) both call it."""
    ts = np.asarray(ts, dtype=np.int64)[:, None]
    click_ts = np.asarray(click_ts, dtype=np.int64)
    hours = np.maximum(ts - click_ts, 0) / 3600.0
    b = 2 + np.floor(np.log2(1.0 + hours)).astype(np.int64)
    b = np.minimum(b, AGE_BUCKETS - 1)
    b = np.where(click_ts > 0, b, 1)
    return np.where(valid, b, 0)


@dataclass
class FeatureSpec:
    categorical: dict[str, int]  # name -> vocabulary size (embedding rows)
    numeric: dict[str, str]  # name -> transform ("log1p" | "none")
    seq_len: int = 200
    short_len: int = 20
    state: dict[str, str] = field(default_factory=lambda: {
        "active_7": "user_active_days_7", "active_30": "user_active_days_30",
        "user_count": "user_clicks_before", "item_count": "item_clicks_before"})
    id_fields: tuple[str, ...] = ("user_idx", "item_idx")
    # name -> (mean, std) of the transformed value over the train split; missing = (0, 1)
    numeric_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    label_rate: float | None = None  # train positive rate: the output bias starts at its logit
    unpadded: tuple[str, ...] = UNPADDED

    def __post_init__(self):
        missing = [f for f in ITEM_FIELDS if f not in self.categorical]
        if missing:
            raise ValueError(f"feature spec lacks the target item field(s) {missing}")
        bad = {k: t for k, t in self.numeric.items() if t not in TRANSFORMS}
        if bad:
            raise ValueError(f"unknown numeric transform(s) {bad}; known: {TRANSFORMS}")
        self.id_fields, self.unpadded = tuple(self.id_fields), tuple(self.unpadded)
        self.numeric_stats = {k: (float(m), float(s)) for k, (m, s) in self.numeric_stats.items()}
        if self.label_rate is not None and not 0.0 < self.label_rate < 1.0:
            raise ValueError(f"label_rate must be in (0, 1), got {self.label_rate}")

    def standardiser(self) -> tuple[list[float], list[float]]:
        """Per numeric field (in `numeric` order): the mean and the std (≥ 1e-6) to standardise with."""
        stats = [self.numeric_stats.get(n, (0.0, 1.0)) for n in self.numeric]
        return [m for m, _ in stats], [max(s, 1e-6) for _, s in stats]

    def fit_ids(self, batch: dict) -> dict:
        """The batch with every id past this spec's tables read as OOV (1): a model trained on an
        earlier ingest, served or scored on a later one that extended its vocabularies
        (pipeline/vocab.py), sees a value it never learnt as the unknown value, as in its training.
        Categorical fields and the behaviors' item fields; tensors in, tensors out (no copy when
        nothing is past)."""
        sizes = {**self.categorical, **{s: self.categorical[f] for f, s in zip(ITEM_FIELDS, SEQ_FIELDS, strict=True)}}
        out = dict(batch)
        for name, size in sizes.items():
            x = batch.get(name)
            if x is not None and len(x) and bool((x >= size).any()):
                out[name] = x.masked_fill(x >= size, 1)
        return out

    @property
    def fields(self) -> list[str]:
        """Field order of the (B, F, D) field-embedding tensor: categorical, then numeric."""
        return [*self.categorical, *self.numeric]

    @property
    def num_fields(self) -> int:
        return len(self.categorical) + len(self.numeric)

    def subset(self, keep) -> FeatureSpec:
        """The spec restricted to the fields for which `keep(name)` is true."""
        return FeatureSpec(
            categorical={k: v for k, v in self.categorical.items() if keep(k)},
            numeric={k: v for k, v in self.numeric.items() if keep(k)},
            seq_len=self.seq_len, short_len=self.short_len, state=dict(self.state), id_fields=self.id_fields,
            numeric_stats={k: v for k, v in self.numeric_stats.items() if keep(k)}, label_rate=self.label_rate,
            unpadded=self.unpadded,
        )

    def with_numeric(self, name: str, transform: str = "none") -> FeatureSpec:
        """The spec plus one numeric field (e.g. "karma_sim", KARMA's similarity as a ranking feature)."""
        out = self.subset(lambda _: True)
        out.numeric[name] = transform
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> FeatureSpec:
        raw = json.loads(Path(path).read_text())
        seq = raw["sequences"]
        return cls(
            categorical={k: int(v["vocab_size"]) for k, v in raw["categorical"].items()},
            numeric={k: v.get("transform", "none") for k, v in raw["numeric"].items()},
            seq_len=int(seq["long_len"]),
            short_len=int(seq["short_len"]),
            numeric_stats={k: (v["mean"], v["std"]) for k, v in raw["numeric"].items() if "mean" in v},
            label_rate=raw.get("label_rate"),
            unpadded=tuple(k for k, v in raw["categorical"].items() if v.get("padding") is False)
            if any("padding" in v for v in raw["categorical"].values()) else UNPADDED,
        )

    @classmethod
    def tiny(cls, seq_len: int = 12, short_len: int = 4) -> FeatureSpec:
        return cls(
            categorical={"user_idx": 40, "item_idx": 60, "cat_idx": 8, "brand_idx": 12, "u_age_idx": 6,
                         "position": 12, "hour": 24},
            numeric={"user_active_days_7": "log1p", "user_active_days_30": "log1p",
                     "user_clicks_before": "log1p", "item_clicks_before": "log1p", "item_ctr": "logit"},
            seq_len=seq_len,
            short_len=short_len,
        )
