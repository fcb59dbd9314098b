"""Vocabularies: contiguous ids, 0 reserved for padding, 1 the out-of-vocabulary bucket.

A value gets its own id only when it was seen at least `min_count` times in
the training period; everything else (rare, or first seen in val/test — a new
user, a cold item) maps to OOV = 1, so no id leaks from the future.

A retrain on newer logs can *extend* an earlier ingest's vocabularies (`base`, data.vocab_from):
every value the earlier one knew keeps its id, new values are appended after them. A model
trained on the earlier ingest then still reads its own ids from the new one, and an id past its
tables reads as OOV (models.spec.FeatureSpec.fit_ids): what a frozen model in production does
when the vocabulary grows. Without it, ids follow the new frequency order, and a model that was
not retrained would read other items' embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

PAD, OOV = 0, 1


@dataclass
class Vocab:
    values: pd.Index  # known values; value values[j] has id j + 2

    @classmethod
    def from_counts(cls, counts: pd.Series, min_count: int = 1, base=None) -> Vocab:
        """Values seen ≥ min_count times, most frequent first (ties by value: deterministic); after
        `base`'s values, in base's order, when given (an extended vocabulary: base ids stay)."""
        kept = counts[counts >= min_count]
        if base is not None:
            base = pd.Index(base)
            kept = kept[~kept.index.isin(base)]
        order = np.lexsort((kept.index.astype(str).to_numpy(), -kept.to_numpy()))
        new = kept.index.to_numpy()[order]
        if base is None:
            return cls(pd.Index(new))
        return cls(base.append(pd.Index(new)))

    @classmethod
    def from_values(cls, values, base=None) -> Vocab:
        return cls.from_counts(pd.Series(values).value_counts(), 1, base)

    @property
    def size(self) -> int:
        """Embedding table size: padding + OOV + known values."""
        return len(self.values) + 2

    def lookup(self, values) -> np.ndarray:
        idx = self.values.get_indexer(pd.Index(values))
        return np.where(idx >= 0, idx + 2, OOV).astype(np.int64)

    def to_list(self) -> list:
        return [v.item() if hasattr(v, "item") else v for v in self.values]


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(texts) -> list[list[str]]:
    """Lower-case word tokens; the title tokenizer of the item table."""
    return [_WORD.findall(str(t).lower()) for t in texts]


def encode_titles(token_lists: list[list[str]], vocab: Vocab, length: int) -> np.ndarray:
    """(n, length) int32 token ids, right-padded with 0, truncated to `length`."""
    out = np.zeros((len(token_lists), length), dtype=np.int32)
    lens = np.array([min(len(t), length) for t in token_lists], dtype=np.int64)
    flat = [w for t in token_lists for w in t[:length]]
    if flat:
        rows = np.repeat(np.arange(len(token_lists)), lens)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
        out[rows, cols] = vocab.lookup(flat)
    return out
