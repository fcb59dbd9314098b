"""The tracking server with MLflow's basic-auth app (mlflow/basic_auth.ini, as the compose file
runs it, on SQLite here): Funnel logs, registers and loads a model through it with the
credentials from the environment, and is refused without them. Slow: the server takes ~20 s
to start."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def auth_server(tmp_path):
    ini = (ROOT / "mlflow" / "basic_auth.ini").read_text().replace("sqlite:////auth/basic_auth.db",
                                                                   f"sqlite:///{tmp_path / 'auth.db'}")
    (tmp_path / "auth.ini").write_text(ini)
    port, password = free_port(), "test-Admin-pass-1"
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("the MLflow basic-auth server exited at start-up")
            time.sleep(0.5)
        yield url, password
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_funnel_logs_and_loads_through_an_authenticated_server(auth_server, tmp_path, monkeypatch):
    import mlflow
    import torch

    from configs import FunnelConfig, TrackingConfig
    from models import build_model
    from models.spec import FeatureSpec
    from training.registry import load_model, log_run, register_with_gate, setup_tracking

    url, password = auth_server
    assert requests.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code == 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    cfg = dataclasses.replace(FunnelConfig(), tracking=TrackingConfig(uri=url, artifact_location="mlflow-artifacts:/t",
                                                                      experiment="auth-test"))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"401|[Uu]nauthori"):
        setup_tracking(cfg.tracking)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    data = tmp_path / "data"
    data.mkdir()
    (data / "feature_spec.json").write_text('{"fingerprint": "fp-auth"}')
    spec = FeatureSpec.tiny()
    torch.manual_seed(0)
    net = build_model("dcnv2", spec, {"embed_dim": 8, "hidden": [16]})
    run = log_run(cfg, "dcnv2", {"embed_dim": 8, "hidden": [16]}, [], {"test_auc": 0.7}, data, net, spec)
    decision = register_with_gate("dcnv2", run)
    assert decision["challenger"]
    loaded = load_model("models:/funnel-dcnv2@challenger")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values(), strict=True))
