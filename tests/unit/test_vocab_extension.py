"""An ingest that extends an earlier one's keys and vocabularies (data.vocab_from): the ids a model
trained on the earlier ingest knows stay, new values come after them, and the model reads ids past
its tables as OOV. Without it a re-ingest renumbers ids by the new frequency order, and a model the
closed loop did not retrain read other items' embeddings (and crashed on the new ids)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.spec import FeatureSpec
from pipeline.catalog import BaseVocabs, build_catalog
from pipeline.vocab import OOV, Vocab


def test_an_extended_vocab_keeps_the_base_ids_and_appends_new_values_by_frequency():
    base = Vocab.from_counts(pd.Series({"a": 5, "b": 3, "c": 1}))
    assert list(base.values) == ["a", "b", "c"]
    # the new period: c is now the most frequent, d and e are new, a is gone
    new = Vocab.from_counts(pd.Series({"c": 9, "b": 4, "e": 2, "d": 7}), 1, base.values)
    assert list(new.values) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(new.lookup(["a", "b", "c"]), base.lookup(["a", "b", "c"]))
    assert new.lookup(["zz"])[0] == OOV
    # without a base, the new frequency order renumbers everything: what broke the loop
    assert Vocab.from_counts(pd.Series({"c": 9, "b": 4, "e": 2, "d": 7})).lookup(["c"])[0] != base.lookup(["c"])[0]


def _catalog_inputs(n_items: int, counts: dict[int, int]):
    items = pd.DataFrame({"item_id": np.arange(100, 100 + n_items), "category": [f"c{i % 3}" for i in range(n_items)],
                          "brand": [f"b{i % 4}" for i in range(n_items)], "title": [f"t{i} word{i % 2}" for i in range(n_items)],
                          "first_seen_ts": np.zeros(n_items, dtype=np.int64)})
    users = pd.DataFrame({"user_id": np.arange(1, 7), "city": ["x", "y", "x", "z", "y", "x"]})
    item_counts = pd.Series(counts)
    user_counts = pd.Series({u: 7 - u for u in range(1, 6)})
    return items, users, item_counts, user_counts


def test_build_catalog_with_a_base_keeps_keys_and_ids(tmp_path):
    items, users, ic, uc = _catalog_inputs(5, {100: 5, 101: 3, 102: 1})
    first = build_catalog(items, users, items["item_id"], users["user_id"], ic, uc, 1, 4)
    first.items.drop(columns=["title_tokens"]).to_parquet(tmp_path / "items.parquet")
    first.users.to_parquet(tmp_path / "users.parquet")
    (tmp_path / "vocab.json").write_text(json.dumps(first.vocabs))

    # later: two more items (a new brand among them), the frequency order turned over
    items2, users2, _, _ = _catalog_inputs(7, {})
    items2.loc[6, "brand"] = "b-new"
    ic2 = pd.Series({102: 20, 105: 9, 101: 4, 106: 2, 100: 1})
    second = build_catalog(items2.iloc[::-1], users2, items2["item_id"], users2["user_id"], ic2, uc, 1, 4,
                           BaseVocabs.load(tmp_path))
    a = first.items.set_index("item_id")
    b = second.items.set_index("item_id")
    for col in ("item_key", "item_idx", "cat_idx", "brand_idx"):
        pd.testing.assert_series_equal(b.loc[a.index, col], a[col])
    assert sorted(b.loc[[105, 106], "item_key"]) == [6, 7]  # new items after the old keys (in input order)
    assert b.loc[105, "item_idx"] == a["item_idx"].max() + 1  # new ids after the old ones, by frequency
    assert b.loc[106, "brand_idx"] == second.vocab_sizes["brand_idx"] - 1
    pd.testing.assert_series_equal(second.users.set_index("user_id")["user_idx"],
                                   first.users.set_index("user_id")["user_idx"])
    # without the base: renumbered
    plain = build_catalog(items2, users2, items2["item_id"], users2["user_id"], ic2, uc, 1, 4).items.set_index("item_id")
    assert (plain.loc[a.index, "item_idx"] != a["item_idx"]).any()


def test_a_base_with_ids_the_new_ingest_lacks_is_refused(tmp_path):
    items, users, ic, uc = _catalog_inputs(5, {100: 5})
    first = build_catalog(items, users, items["item_id"], users["user_id"], ic, uc, 1, 4)
    first.items.drop(columns=["title_tokens"]).to_parquet(tmp_path / "items.parquet")
    first.users.to_parquet(tmp_path / "users.parquet")
    (tmp_path / "vocab.json").write_text(json.dumps(first.vocabs))
    fewer = items.iloc[:3]
    with pytest.raises(ValueError, match="item_ids of the earlier ingest are missing"):
        build_catalog(fewer, users, fewer["item_id"], users["user_id"], ic, uc, 1, 4, BaseVocabs.load(tmp_path))
    with pytest.raises(FileNotFoundError, match="not an ingest output"):
        BaseVocabs.load(tmp_path / "nowhere")


def test_fit_ids_reads_ids_past_the_models_tables_as_oov():
    spec = FeatureSpec.tiny()
    n_item = spec.categorical["item_idx"]
    batch = {"item_idx": torch.tensor([2, n_item - 1, n_item, n_item + 5]),
             "hist_item_idx": torch.tensor([[0, 3, n_item + 1]]), "label": torch.tensor([1.0, 0, 0, 1])}
    out = spec.fit_ids(batch)
    assert out["item_idx"].tolist() == [2, n_item - 1, OOV, OOV]
    assert out["hist_item_idx"].tolist() == [[0, 3, OOV]]  # padding stays padding
    assert out["label"] is batch["label"]
    inside = {"item_idx": torch.tensor([2, 3])}
    assert spec.fit_ids(inside)["item_idx"] is inside["item_idx"]  # nothing past: no copy
