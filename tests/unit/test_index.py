"""FAISS item index against exact inner-product search on synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest

from serving.index import IndexParams, ItemIndex, exact_top_k, recall_at_k


def _data(n=4000, d=32, q=200, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, d))
    items = centers[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, d))
    queries = centers[rng.integers(0, 40, q)] + 0.5 * rng.normal(size=(q, d))
    return items.astype(np.float32), queries.astype(np.float32)


def test_flat_equals_exact_search_and_returns_keys():
    items, queries = _data()
    keys = np.arange(1, len(items) + 1) * 7  # arbitrary item keys
    idx = ItemIndex(items.shape[1], IndexParams("Flat")).build(keys, items)
    _, got = idx.search(queries, 20)
    truth = keys[exact_top_k(queries, items, 20)]
    assert recall_at_k(got, truth) == 1.0


def test_ivf_recall_rises_with_nprobe():
    items, queries = _data()
    truth = exact_top_k(queries, items, 50)
    recalls = []
    for nprobe in (1, 4, 64):
        idx = ItemIndex(items.shape[1], IndexParams("IVF64,Flat", nprobe=nprobe)).build(np.arange(len(items)), items)
        recalls.append(recall_at_k(idx.search(queries, 50)[1], truth))
    assert recalls[0] < recalls[1] < recalls[2] and recalls[2] > 0.97


def test_hnsw_recall_rises_with_ef_search():
    items, queries = _data()
    truth = exact_top_k(queries, items, 10)
    idx = ItemIndex(items.shape[1], IndexParams("HNSW8", ef_search=10)).build(np.arange(len(items)), items)
    low = recall_at_k(idx.search(queries, 10)[1], truth)
    idx.params.ef_search = 256
    high = recall_at_k(idx.search(queries, 10)[1], truth)
    assert high > low and high > 0.95


def test_cold_start_items_join_without_retraining(tmp_path):
    items, queries = _data()
    idx = ItemIndex(items.shape[1], IndexParams("IVF32,Flat", nprobe=32)).build(np.arange(1, 3001), items[:3000])
    new = queries[:5] * 3.0  # new items that are the best match of the first 5 queries
    idx.add(np.arange(9001, 9006), new)
    _, got = idx.search(queries[:5], 1)
    assert got[:, 0].tolist() == list(range(9001, 9006))
    idx.add(np.array([9001]), -new[:1])  # re-adding a key replaces it
    assert idx.ntotal == 3005 and idx.search(queries[:1], 1)[1][0, 0] != 9001
    back = ItemIndex.load(idx.save(tmp_path / "ix", {"model_version": "3"}))
    assert back.ntotal == 3005 and (back.search(queries, 10)[1] == idx.search(queries, 10)[1]).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="factory string 'NOPE'"):
        ItemIndex(8, IndexParams("NOPE"))
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        ItemIndex(8).build(np.arange(3), np.zeros((3, 9)))
    with pytest.raises(ValueError, match="cannot train 1024 inverted lists"):
        ItemIndex(8, IndexParams("IVF1024,Flat")).build(np.arange(100), np.ones((100, 8)))
