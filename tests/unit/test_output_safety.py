"""Ingest never deletes what Funnel did not write, and a failed run leaves the previous output."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from pipeline.outputs import MARKER, check_output, output_folder


def _cfg(tiny_cfg, output, input_=""):
    return dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, output=str(output), input=str(input_)))


def test_an_output_that_is_or_holds_the_input_is_refused(tiny_cfg, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events.parquet").write_bytes(b"user data")
    with pytest.raises(ValueError, match="is the input"):
        check_output(_cfg(tiny_cfg, logs, logs))
    with pytest.raises(ValueError, match="contains the input"):
        check_output(_cfg(tiny_cfg, tmp_path, logs))
    assert (logs / "events.parquet").read_bytes() == b"user data"


def test_a_real_ingest_refuses_a_folder_funnel_did_not_write(tiny_cfg, tmp_path):
    """Today's ingest would have removed this folder before reading anything."""
    from pipeline.ingest import run_ingest_local
    from pipeline.readers import RawTables
    from pipeline.simulator import simulate_local

    mine = tmp_path / "my_notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    ev, items, users = simulate_local(tiny_cfg.world)
    with pytest.raises(ValueError, match="not written by Funnel"):
        run_ingest_local(_cfg(tiny_cfg, mine), ev, RawTables(None, items, users, True, "simulator"))
    assert (mine / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes"]  # no temp folder left behind


def test_a_failed_run_leaves_the_previous_output_and_a_good_one_replaces_it(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path / "out")
    with output_folder(cfg) as out:
        (out / "stats.json").write_text("first")
    assert (tmp_path / "out" / MARKER).exists() and (tmp_path / "out" / "stats.json").read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"), output_folder(cfg) as out:
        (out / "stats.json").write_text("half-written")
        raise RuntimeError("boom")
    assert (tmp_path / "out" / "stats.json").read_text() == "first"
    with output_folder(cfg) as out:
        (out / "stats.json").write_text("second")
    assert (tmp_path / "out" / "stats.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or previous folder left


def test_an_empty_folder_or_an_earlier_funnel_output_may_be_replaced(tiny_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(_cfg(tiny_cfg, tmp_path / "empty")) == (tmp_path / "empty").resolve()
    old = tmp_path / "old"
    old.mkdir()
    pd.DataFrame({"a": [1]}).to_json(old / "stats.json")
    (old / "feature_spec.json").write_text("{}")
    assert check_output(_cfg(tiny_cfg, old)) == old.resolve()
