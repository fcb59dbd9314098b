"""Retrieval evaluated the way a recall channel is used (training/retrieval.py): availability at
the request time, popularity alone, and the merged recall at the served sizes."""

import numpy as np
import pytest
import torch


def _catalogue(n=10, released=None, clicks=None, oov=()):
    from training.retrieval import Catalogue

    titles = torch.arange(1, (n + 1) * 2 + 1).reshape(n + 1, 2)
    titles[0] = 0
    o = np.zeros(n + 1, dtype=bool)
    o[list(oov)] = True
    return Catalogue(titles, o, np.zeros(n + 1, np.float32), {}, released, clicks)


def test_popularity_only_offers_items_released_at_the_rows_time():
    from training.retrieval import popularity_topk

    clicks = np.array([0, 5, 9, 1, 7, 0, 0, 0, 0, 0, 3], dtype=float)
    released = np.full(11, -1)
    released[2] = 100  # the most clicked item arrives at ts 100
    cat = _catalogue(released=released, clicks=clicks)
    top = popularity_topk(cat, np.array([50, 150]), 3)
    assert top.tolist() == [[4, 1, 10], [2, 4, 1]]


def test_served_recall_counts_the_union_against_popularity_at_the_same_size():
    from training.retrieval import served_recall

    clicks = np.array([0, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=float)
    cat = _catalogue(clicks=clicks, oov=(10,))
    retrieved = np.array([[9, 8], [10, 1], [5, 6]])  # the retriever's top R = 2
    target = np.array([9, 10, 7])
    out = served_recall(retrieved, target, np.zeros(3, np.int64), cat, k=2, r=2, p=1)
    # merged = retriever top 2 ∪ popularity top 1 (item 1); popularity alone at 3 = items 1, 2, 3
    assert out["merged_hr_2+1"] == pytest.approx(2 / 3) and out["pop_hr_3"] == 0.0 and out["pop_hr_1"] == 0.0
    assert out["merged_minus_pop"] == pytest.approx(2 / 3) and out["merged_hr_2+1_cold"] == 1.0


def test_merged_recall_fills_the_slots_popularity_already_holds():
    """The server takes popularity's P and the retriever's best R items *not among them*: R + P
    distinct candidates, the size popularity alone is measured at. A retriever whose top R repeats
    popular items is backfilled from its next ranks, not served fewer candidates."""
    from training.retrieval import served_recall

    clicks = np.array([0, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=float)
    cat = _catalogue(clicks=clicks)
    # popularity's top 1 is item 1; the retriever ranks it first, so its 2 slots go to 5 and then 6
    retrieved = np.array([[1, 5, 6], [1, 5, 6], [5, 1, 1]])
    target = np.array([6, 7, 1])
    out = served_recall(retrieved, target, np.zeros(3, np.int64), cat, k=2, r=2, p=1)
    assert out["merged_hr_2+1"] == pytest.approx(2 / 3)  # rows 0 (6, backfilled) and 2 (popular)


def test_evaluation_masks_items_not_yet_released():
    """A retriever that would rank an unreleased item first: at its row's ts the item is not a candidate."""
    from training.retrieval import evaluate_retrieval

    class Fixed(torch.nn.Module):
        def encode_items(self, keys):
            return torch.nn.functional.one_hot(keys, 11).float()

        def encode_users(self, hist, lens):
            return torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 5.0]]).expand(len(hist), 11)

    released = np.full(11, -1)
    released[10] = 1_000
    cat = _catalogue(released=released, clicks=np.arange(11, dtype=float))
    b = {"hist_item_key": torch.ones(2, 3, dtype=torch.long), "hist_len": torch.ones(2, dtype=torch.long),
         "item_key": torch.tensor([10, 1]), "ts": torch.tensor([2_000, 500])}
    out = evaluate_retrieval(Fixed(), [b], cat, k=1, served=(1, 1))
    assert out["hr_1"] == 1.0  # row 0 finds item 10 (released); row 1 gets item 1, not the unreleased 10
    assert "user_cos" in out and out["pop_hr_1"] == 0.5  # popularity: item 10 at ts 2,000, item 9 at ts 500
