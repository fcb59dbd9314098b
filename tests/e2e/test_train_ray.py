"""Ray Train on the tiny world: a real 1-worker TorchTrainer, and resume after a failure."""

from __future__ import annotations

import dataclasses

import pytest

from training.loop import fit

pytestmark = pytest.mark.ray


@pytest.fixture
def tiny_data(tiny_processed):
    return tiny_processed


def _cfg(tiny_cfg, tmp_path, **train):
    t = dataclasses.replace(tiny_cfg.train, storage_path=str(tmp_path / "ray_runs"), num_workers=1, **train)
    return dataclasses.replace(tiny_cfg, train=t)


def test_small_splits_go_to_the_object_store_with_every_row(ray_session, tiny_data):
    """training.loop.in_object_store: the rows read_parquet streams, read once by pyarrow and split
    into blocks of the size asked for."""
    import pyarrow.parquet as pq
    import ray.data

    from training.loop import in_object_store

    path = tiny_data / "ranking" / "split=val"
    streamed = ray.data.read_parquet(str(path)).to_pandas()
    ds = in_object_store(path, block_bytes=pq.read_table(str(path)).nbytes // 3)
    stored = ds.to_pandas()
    assert ds.num_blocks() >= 3 and len(stored) == len(streamed) > 1000
    assert set(stored.columns) <= set(streamed.columns) and {"label", "item_idx", "hist_end"} <= set(stored.columns)
    assert all(stored[c].dtype == streamed[c].dtype for c in stored.columns)
    key = ["ts", "user_idx", "item_idx", "label"]
    a = stored[key].sort_values(key).reset_index(drop=True)
    b = streamed[key].sort_values(key).reset_index(drop=True)
    assert a.equals(b)


@pytest.mark.slow  # the e2e smoke fits its three models on 1-worker TorchTrainers (tests/e2e/served/)
def test_one_worker_torch_trainer_trains_and_tests(ray_session, tiny_cfg, tiny_data, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path, epochs=2, patience=5, batch_size=512, lr=3e-3, new_user_max_clicks=2,
               cold_item_max_clicks=5)
    res = fit(cfg, str(tiny_data), "dcnv2", {"embed_dim": 8, "hidden": [32]}, name="smoke")
    assert res.error is None
    m = res.metrics
    assert m["epoch"] == 1 and m["test_auc"] > 0.6 and m["val_auc"] > 0.6
    assert {"test_gauc", "test_logloss", "test_auc_new_users", "test_auc_cold_items"} <= set(m)
    assert res.checkpoint is not None


@pytest.mark.parametrize(("model", "workers"), [
    pytest.param("karma", 1, marks=pytest.mark.slow),  # the e2e smoke fits KARMA on a 1-worker TorchTrainer
    ("adaf2m2:two_tower", 0),
])
def test_retrieval_models_train_on_ray_train(ray_session, tiny_cfg, tiny_data, tmp_path, model, workers):
    """The same loop for retrieval: the model's own loss, full-catalogue HR@K each epoch,
    early stopping on it, the best weights tested."""
    cfg = _cfg(tiny_cfg, tmp_path, epochs=2, patience=5, batch_size=256, lr=3e-3, seq_len=20)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=workers))
    res = fit(cfg, str(tiny_data), model, None, name=f"smoke-{model.replace(':', '-')}", tiny=True)
    assert res.error is None
    m = res.metrics
    assert m["epoch"] == 1 and m["train_loss"] > 0
    assert {"val_hr_50", "test_hr_50", "test_ndcg_50", "test_js_50", "best_val_hr_50"} <= set(m)
    assert 0.0 <= m["test_hr_50"] <= 1.0 and m["best_val_hr_50"] >= m["val_hr_50"] - 1e-9
    if model == "adaf2m2:two_tower":
        assert "train_feature_mask" in m  # the AdaF2M2 towers' aux term was trained


@pytest.mark.parametrize("model", ["din", "dlf", "sim_hard", "mean_pool", "two_tower"])
def test_every_other_model_runs_the_same_loop_with_num_workers_0(ray_session, tiny_cfg, tiny_data, tmp_path, model):
    """The loop itself (`ScalingConfig(num_workers=0)`: local, no worker group) for the models
    the TorchTrainer tests above do not cover; each trains, validates and tests."""
    cfg = _cfg(tiny_cfg, tmp_path, epochs=1, patience=5, batch_size=512)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=0))
    res = fit(cfg, str(tiny_data), model, None, name=f"local-{model}", tiny=True)
    assert res.error is None
    metric = "test_hr_50" if model == "two_tower" else "test_auc"
    assert 0.0 <= res.metrics[metric] <= 1.0 and res.metrics["train_loss"] > 0


@pytest.mark.slow  # ~52 s (a worker group restarted): `make test` on a fresh clone reached 9:32 of its 10 minutes
def test_resume_after_the_worker_is_killed(ray_session, tiny_cfg, tiny_data, tmp_path):
    """A real failure, nothing injected into the loop: the Ray Train worker process is SIGKILLed
    once Ray has registered its first checkpoint; Ray restarts the worker group (FailureConfig)
    and the loop resumes from the latest registered checkpoint, so no finished epoch is trained
    twice."""
    import json
    import signal
    import threading
    import time

    import psutil

    cfg = _cfg(tiny_cfg, tmp_path, epochs=6, patience=99, batch_size=64, max_failures=1)
    snapshot = tmp_path / "ray_runs" / "resume" / "checkpoint_manager_snapshot.json"

    def registered_epochs() -> list[int]:
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # not written yet, or being rewritten
            return []
        return [int(r["metrics"]["epoch"]) for r in results]

    killed: list[tuple[int, list[int]]] = []  # (pid, epochs registered when it was killed)

    def kill_after_first_registered_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if done := registered_epochs():
                for p in psutil.process_iter(["pid", "cmdline"]):
                    if any("RayTrainWorker" in c for c in p.info["cmdline"] or []):
                        p.send_signal(signal.SIGKILL)
                        killed.append((p.pid, done))
                if killed:
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_first_registered_checkpoint, daemon=True)
    killer.start()
    res = fit(cfg, str(tiny_data), "mean_pool", None, name="resume", tiny=True)
    killer.join(timeout=5)
    assert killed and all(len(done) < 6 for _, done in killed), killed  # killed mid-run
    assert res.error is None
    assert res.metrics["epoch"] == 5 and "test_auc" in res.metrics  # all six epochs, then the test
    assert registered_epochs() == [0, 1, 2, 3, 4, 5]  # resumed: no finished epoch reported twice


def test_train_job_end_to_end(ray_session, tiny_cfg, tiny_data, tmp_path, monkeypatch, capsys):
    """jobs.train: Ray Train fit → MLflow run → registry gate → one JSON line. The fit runs Ray
    Train's local loop (num_workers=0); the e2e smoke runs this path on worker groups."""
    import json

    from jobs import train
    from tests.conftest import ROOT
    from training.registry import load_model

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model", "adaf2m2:dcnv2", "--tiny",
            "--data", str(tiny_data), "--set", "train.epochs=1", "--set", "train.batch_size=1024",
            "--set", "train.num_workers=0"]
    assert train.main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["registered"] == "funnel-adaf2m2-dcnv2" and line["version"] == 1 and line["challenger"]
    assert 0.0 <= line["test_auc"] <= 1.0 and "test_gauc" in line  # one short epoch: wiring, not learning
    assert load_model("models:/funnel-adaf2m2-dcnv2@challenger") is not None
    assert (tmp_path / "runs" / "mlflow.db").exists()  # the default SQLite tracking store


def test_train_job_rejects_bad_params(tiny_cfg, tiny_data):
    from jobs import train
    from tests.conftest import ROOT

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nope'\]"):
        train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--model", "cdnet", "--data", str(tiny_data),
                    "--params", '{"nope": 1}'])
