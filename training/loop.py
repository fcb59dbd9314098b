"""Ray Train for every model: one `train_loop_per_worker`, a `TorchTrainer` around it.

Ray touches the loop in four places only: the dataset shards (`get_dataset_shard`), the
model preparation (`prepare_model`: device placement, DDP with several workers), the
checkpoint to resume from (`get_checkpoint`) and `report`. Everything else is the plain
PyTorch step and metrics of training/step.py.

What differs between ranking and retrieval models (rows, batches, evaluation, the metric
to stop on) lives in training/tasks.py; the loop is the same for both.

Per epoch: train over the shard, validate on the whole val set (not split across workers),
report metrics with a checkpoint (model, optimizer, epoch, the best weights so far).
After a worker failure, Ray restarts the group (`FailureConfig(max_failures)`) and the
loop resumes from the latest checkpoint. Early stopping on val AUC (ranking) or HR@K
(retrieval); the best weights are evaluated on the test split in the last report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from configs import FunnelConfig

CKPT = "state.pt"


def _shard_batches(name: str, batcher, batch_size: int, shuffle: bool, seed: int):
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=batcher, device="cpu",
        local_shuffle_buffer_size=4 * batch_size if shuffle else None, local_shuffle_seed=seed if shuffle else None,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from training.fit import EarlyStopping
    from training.step import make_optimizer, to_device, train_step
    from training.tasks import task_from_config

    cfg: FunnelConfig = config["cfg"]
    t = cfg.train
    torch.manual_seed(t.seed)
    task = task_from_config(config["model"], config["data_dir"], t)
    batcher, metric = task.batcher, task.metric
    model = task.build(config["model"], config.get("params") or None, tiny=config.get("tiny", False))
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    amp = torch.bfloat16 if device.type == "cuda" else None
    stopper = EarlyStopping(t.patience, t.epochs)
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # a restarted worker group resumes from the latest report
        with ckpt.as_directory() as d:
            saved = torch.load(Path(d) / CKPT, map_location="cpu", weights_only=True)
        _unwrap(model).load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        stopper.load_state_dict(saved["early_stopping"])

    stop = stopper.done
    while not stop:
        epoch = stopper.epoch
        sums, n = {}, 0
        for b in _shard_batches("train", batcher, t.batch_size, True, t.seed + epoch):
            for k, v in train_step(model, to_device(b, device), opt, amp).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        val = task.evaluate(model, _shard_batches("val", batcher, t.batch_size, False, 0), device, amp)
        metrics = {"epoch": epoch, **{f"train_{k}": v / max(n, 1) for k, v in sums.items()},
                   **{f"val_{k}": v for k, v in val.items()}}
        stop = stopper.update(val[metric], _unwrap(model))
        if stop:  # test the best weights in this, the last, report
            stopper.restore_best(_unwrap(model))
            test = task.evaluate(model, _shard_batches("test", batcher, t.batch_size, False, 0), device, amp)
            metrics |= {f"test_{k}": v for k, v in test.items()} | {f"best_val_{metric}": stopper.best}
        local = config.get("local_checkpoints")  # Ray Train's local mode keeps the directory, uploads nothing
        with (contextlib.nullcontext(_epoch_dir(local, epoch)) if local else tempfile.TemporaryDirectory()) as d:
            torch.save({"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                        "early_stopping": stopper.state_dict()}, Path(d) / CKPT)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _epoch_dir(root: str, epoch: int) -> str:
    d = Path(root) / f"checkpoint_{epoch:06d}"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def best_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The best epoch's weights saved in a checkpoint of `train_loop_per_worker` (its early-stopping state)."""
    saved = torch.load(Path(checkpoint_dir) / CKPT, map_location="cpu", weights_only=True)
    return saved["early_stopping"]["best_state"]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def cpu_share(per_worker: float, workers: int, cpus: float) -> float:
    """CPUs each of `workers` train workers running at once may ask for, at most `per_worker`:
    one whole CPU stays free for the Ray Data tasks that feed them (each asks for a full CPU;
    without one free, every fit waits forever — on 2 cores, two fits get 0.45 each)."""
    return min(per_worker, max(0.05, round(0.9 * max(cpus - 1.0, 0.5) / max(workers, 1), 2)))


def in_object_store(folder: Path, block_bytes: int = 64 * 2**20):
    """A small split read once per fit into Ray's object store, so that no epoch reads a file.

    Streamed (`ray.data.read_parquet`), every epoch's pass over every split is a new Ray Data
    execution, whose file-listing and read tasks cost seconds of start-up each on 2 cores: a tiny
    1-worker fit spent 35 of its 41 s in the loop waiting for first batches (benchmarks/RESULTS.md,
    "The test suite's time"). Here pyarrow reads the split in the driver (no Ray task) and the
    table goes to the object store in blocks of about `block_bytes`.
    """
    import pyarrow.parquet as pq
    import ray.data

    table = pq.read_table(str(folder), partitioning=None)
    step = max(1, -(-table.num_rows // max(1, -(-table.nbytes // block_bytes))))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)] or [table])


def parquet_bytes(folder: Path) -> int:
    """Bytes of the parquet files under `folder` (a split of the ingest output)."""
    return sum(f.stat().st_size for f in folder.rglob("*.parquet"))


def use_gpu(cfg: FunnelConfig) -> bool:
    if cfg.train.use_gpu == "auto":
        import ray

        return torch.cuda.is_available() or (ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0)
    return cfg.train.use_gpu == "true"


def fit(cfg: FunnelConfig, data_dir: str, model: str, params: dict | None = None, *, name: str = "funnel",
        tiny: bool = False, callbacks: list | None = None,
        storage_path: str | None = None):
    """Run a TorchTrainer over the ingest output in `data_dir`; returns Ray's Result."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from training.tasks import is_retrieval

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # shortens Ray Train's fixed cost (STACK.md)
    # Ray Data's per-epoch progress bars of the workers' feeders would flood the job's output;
    # the datasets carry this context to the workers.
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = Path(data_dir)
    folder = "retrieval" if is_retrieval(model) else "ranking"
    if is_retrieval(model) and cfg.train.retrieval_epochs:  # one row per click: its own epoch budget
        import dataclasses

        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.retrieval_epochs))
    # fixed random samples (same seed, same rows), for budgets like the demo's Tune trials
    limits = {"train": cfg.train.max_train_rows, "val": cfg.train.max_val_rows, "test": cfg.train.max_test_rows}
    cap = cfg.train.materialize_max_mb * 2**20
    datasets = {}
    for split, limit in limits.items():
        path = root / folder / f"split={split}"
        small = bool(cap) and parquet_bytes(path) <= cap
        ds = in_object_store(path) if small else ray.data.read_parquet(str(path))
        if limit and (n := ds.count()) > limit:
            ds = ds.random_sample(limit / n, seed=cfg.train.seed)
            if small:
                ds = ds.materialize()  # sampled once per fit, not at every epoch
        datasets[split] = ds
    storage = Path(storage_path or cfg.train.storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "data_dir": str(root.resolve()), "model": model, "params": params,
                           "tiny": tiny,
                           # num_workers=0 (local mode): Ray Train keeps each reported checkpoint where it
                           # is, so the loop writes them under the run's storage, not to a temp folder
                           "local_checkpoints": str(storage / name / "local") if cfg.train.num_workers == 0 else None},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu(cfg),
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()

