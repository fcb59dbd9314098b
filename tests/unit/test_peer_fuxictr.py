"""benchmarks/peer_fuxictr.py on a tiny batch: both sides train on the same inputs at the same size.

FuxiCTR is a benchmark-only extra (`make bench-peer`): without it this test is skipped."""

from __future__ import annotations

import json

import pytest


def test_both_sides_step_on_identical_inputs_with_matching_parameter_counts(tmp_path):
    pytest.importorskip("fuxictr")
    from benchmarks import peer_fuxictr

    out = tmp_path / "peer.json"
    assert peer_fuxictr.main(["--batch", "32", "--seq-len", "6", "--rounds", "1", "--steps", "1",
                              "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dcnv2", "din"}
    for r in rows.values():
        assert r["ratio"] > 0 and r["funnel"]["samples_per_s"] > 0 and r["fuxictr"]["samples_per_s"] > 0
        # the same tables and layers on both sides: Funnel adds only its numeric biases (8 fields × 64)
        assert r["funnel"]["params"] - r["fuxictr"]["params"] == 8 * 64
