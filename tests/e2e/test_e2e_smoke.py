"""End-to-end smoke: the e2e job on the tiny world, on the session's real Ray cluster."""

import json

import pytest

from jobs import e2e
from tests.conftest import ROOT

pytestmark = pytest.mark.ray


def test_e2e_runs_and_resumes(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/ markers land in the temp folder
    out = tmp_path / "processed"
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data.output={out}"]
    assert e2e.main(args) == 0
    printed = capsys.readouterr().out
    assert "events in" in printed and "rejected" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"]["events"] == stats["accepted_events"] + stats["rejected_events"]
    marker = tmp_path / "runs" / "e2e" / "tiny" / "ingest.json"
    assert json.loads(marker.read_text())["fingerprint"] == stats["fingerprint"]
    assert e2e.main(args) == 0  # resumes: the finished stage is skipped
    assert "done earlier" in capsys.readouterr().out
