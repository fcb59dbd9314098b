"""The batch contract between the pipeline and the models.

A ranking batch is a dict of tensors (B = batch size, L = long sequence length):

  categorical fields   (B,)   int64   one per `FeatureSpec.categorical` (user_idx, item_idx, cat_idx,
                                       brand_idx, profile ids, position, hour, dow); 0 = padding, 1 = OOV
  numeric fields       (B,)   float32 one per `FeatureSpec.numeric` (past-only counters, CTRs, state)
  hist_item_idx, hist_cat_idx, hist_brand_idx
                       (B, L) int64   the user's clicks strictly before ts, left-padded with 0,
                                       most recent last (pipeline.history.HistoryStore.gather)
  hist_len             (B,)   int64   valid positions, min(hist_end, L)
  label                (B,)   float32

`FeatureSpec.from_json` reads the pipeline's feature_spec.json; `FeatureSpec.tiny`
is the small spec the unit tests use. The spec is plain data: no torch, no I/O
beyond reading that file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ITEM_FIELDS = ("item_idx", "cat_idx", "brand_idx")  # the target item; behaviors carry the same three
SEQ_FIELDS = tuple(f"hist_{f}" for f in ITEM_FIELDS)


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

    def __post_init__(self):
        missing = [f for f in ITEM_FIELDS if f not in self.categorical]
        if missing:
            raise ValueError(f"feature spec lacks the target item field(s) {missing}")

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
        )

    @classmethod
    def tiny(cls, seq_len: int = 12, short_len: int = 4) -> FeatureSpec:
        return cls(
            categorical={"user_idx": 40, "item_idx": 60, "cat_idx": 8, "brand_idx": 12, "u_age_idx": 6,
                         "position": 12, "hour": 24},
            numeric={"user_active_days_7": "log1p", "user_active_days_30": "log1p",
                     "user_clicks_before": "log1p", "item_clicks_before": "log1p", "item_ctr": "none"},
            seq_len=seq_len,
            short_len=short_len,
        )
