"""Readers turn each format into the canonical tables (small files written here)."""

import pandas as pd
import pytest

from pipeline.readers import movielens1m_frames, read_generic, taobao_to_canonical


def test_movielens_1m_dat_files(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::11::3::978302109\n2::10::4::978301968\n",
                                          encoding="latin-1")
    (tmp_path / "movies.dat").write_text("10::GoldenEye (1995)::Action|Adventure|Thriller\n"
                                         "11::Amélie (2001)::Comedy|Romance\n", encoding="latin-1")
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n", encoding="latin-1")
    events, items, users = movielens1m_frames(tmp_path)
    assert events["event"].tolist() == ["click", "impression", "click"]
    assert list(events.columns) == ["user_id", "item_id", "ts", "event", "request_id", "position"]
    it = items.set_index("item_id")
    assert it.loc["10", "category"] == "Action" and it.loc["10", "title"] == "GoldenEye"
    assert it.loc["11", "title"] == "Amélie" and it.loc["11", "brand"] == "2001"
    assert it.loc["10", "first_seen_ts"] == 978300760
    assert set(users.columns) == {"user_id", "age", "gender", "occupation"}


def test_taobao_behaviors_map_to_canonical_kinds():
    raw = pd.DataFrame({"user_id": ["1"] * 4, "item_id": ["9"] * 4, "category_id": ["3"] * 4,
                        "behavior_type": ["pv", "buy", "cart", "fav"], "timestamp": ["1511544070"] * 4})
    out = taobao_to_canonical(raw)
    assert out["event"].tolist() == ["click", "buy", "cart", "fav"]


@pytest.mark.ray
def test_generic_reader_with_column_map(ray_session, tmp_path):
    pd.DataFrame({"uid": [1, 2], "sku": [7, 8], "time": ["2024-01-01T10:00:00", "1704103200"],
                  "action": ["click", "impression"]}).to_parquet(tmp_path / "events.parquet")
    pd.DataFrame({"sku": ["7", "8"], "cat": ["a", "b"]}).to_csv(tmp_path / "items.csv", index=False)
    raw = read_generic(tmp_path, {"user_id": "uid", "item_id": "sku", "ts": "time", "event": "action",
                                  "category": "cat"})
    ev = raw.events.to_pandas()
    assert list(ev.columns) == ["user_id", "item_id", "ts", "event", "request_id", "position"]
    assert raw.items["category"].tolist() == ["a", "b"]
    assert raw.has_impressions


def test_generic_reader_names_missing_columns(tmp_path):
    pd.DataFrame({"uid": [1], "sku": [7]}).to_csv(tmp_path / "events.csv", index=False)
    with pytest.raises(ValueError, match=r"missing canonical column\(s\) \['ts', 'event'\].*column_map"):
        read_generic(tmp_path, {"user_id": "uid", "item_id": "sku"})
