"""Shared fixtures. Ray starts once per session, inside pytest's temp folder."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from configs import FunnelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (Serve, an MLflow server) for one test module, drawn from
    20000-29999: outside the kernel's ephemeral range (32768-60999 by default), where every
    outgoing connection takes its local port, so that a port free now is not taken by one of Ray's
    many connections before Serve binds it (a fresh-clone run failed so: "Failed to bind to address
    127.0.0.1:45959"); also outside Ray's worker ports (10002-19999) and Serve's direct-ingress ports
    (from 30000)."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20_000, 30_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999 on 127.0.0.1")


@pytest.fixture(scope="session")
def tiny_cfg() -> FunnelConfig:
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_processed(tiny_cfg, tmp_path_factory) -> Path:
    """The tiny world ingested once per session (single-process path, no Ray needed)."""
    import dataclasses

    from pipeline.ingest import run_ingest_local
    from pipeline.readers import RawTables
    from pipeline.simulator import simulate_local

    out = tmp_path_factory.mktemp("tiny_processed")
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, output=str(out)))
    ev, items, users = simulate_local(cfg.world)
    run_ingest_local(cfg, ev, RawTables(None, items, users, True, "simulator"))
    return out


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A real local Ray cluster for the whole session (2 CPUs, small object store)."""
    tmp = tmp_path_factory.mktemp("ray")
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    os.environ.setdefault("RAY_DATA_DEFAULT_SHUFFLE_STRATEGY", "sort_shuffle_pull_based")
    import ray
    from ray.data import DataContext

    from jobs.common import ray_startup_env, serve_startup_env

    ray_startup_env()
    serve_startup_env()
    ray.init(
        num_cpus=2,
        object_store_memory=300_000_000,
        include_dashboard=False,
        _temp_dir=str(tmp),
        configure_logging=False,
        log_to_driver=False,
    )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
