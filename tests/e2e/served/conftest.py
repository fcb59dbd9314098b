"""The e2e job's run on the tiny world, shared by the served-funnel tests of this package.

The fixtures are package-scoped: the job runs once for the whole package, and its Serve app is
shut down after the package's last test, before the other e2e modules train on Ray. The files run
in the order of their numbers. The job's own test comes first, and the loop, which redeploys the
app, comes last.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import ROOT, free_port


@pytest.fixture(scope="package")
def e2e_run(ray_session, tmp_path_factory):
    """`jobs.e2e` on the tiny world, every stage: ingest → train (KARMA, LREA, CDNet) → tune →
    index → deploy (real HTTP on 127.0.0.1) → simulated A/B → promote. The funnel it
    deployed stays up for the serving tests of this package
    (tests/e2e/served/, a package so that Serve shuts down before the other e2e tests)."""
    from ray import serve

    from jobs import e2e

    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # runs/ (markers, MLflow, Ray Train storage, event log) lands in the temp folder
        args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data.output={root / 'processed'}",
                "--set", f"serve.port={port}", "--set", "serve.reload_s=0"]
        assert e2e.main(args) == 0
        deployed = json.loads((root / "runs" / "e2e" / "tiny" / "deploy.json").read_text())
        yield {"root": root, "url": deployed["url"], "proxy_url": f"http://127.0.0.1:{port}", "args": args,
               "processed": root / "processed", "log": root / "runs" / "served_events"}
    serve.shutdown()


@pytest.fixture(scope="package")
def served(e2e_run):
    return e2e_run["url"], e2e_run["log"]


@pytest.fixture(scope="package")
def auth(e2e_run):
    """The bearer token the deploy stage created (runs/serve_token, mode 0600)."""
    path = e2e_run["root"] / "runs" / "serve_token"
    assert path.stat().st_mode & 0o077 == 0
    return {"Authorization": f"Bearer {path.read_text().strip()}"}


@pytest.fixture(scope="package")
def tiny_processed(e2e_run):
    return e2e_run["processed"]


@pytest.fixture(scope="package")
def user_ids(tiny_processed) -> list[str]:
    """The first 40 users of the tiny world's user table."""
    return pd.read_parquet(tiny_processed / "users.parquet")["user_id"].astype(str).head(40).tolist()
