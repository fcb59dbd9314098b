"""The two model families behind one interface, so one training loop serves both.

- `RankingTask`: rows from `ranking/` (impressions), `RankingBatcher`, BCE + the model's
  named aux terms; evaluation = AUC, GAUC, LogLoss and AUC per state group (new/old users,
  cold/hot items, thresholds from `train.*_max_clicks`); early stopping on val AUC.
- `RetrievalTask`: rows from `retrieval/` (one per click), `RetrievalBatcher` (plus the
  log-q of each target for the two-tower's sampled softmax), each model's own loss + aux
  terms; evaluation = full-catalogue HR/NDCG/JS@K, overall and for cold-start targets;
  early stopping on val HR@K.

Plain PyTorch: the Ray Train loop (training/loop.py), the plain fit loops and the
benchmarks all build models and evaluate them through these.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model
from training.batches import RankingBatcher, RetrievalBatcher
from training.retrieval import Catalogue, evaluate_retrieval
from training.step import predict_ranking, ranking_metrics

RETRIEVAL = ("karma", "two_tower", "adaf2m2:two_tower")
STATE_COLUMNS = ("user_clicks_before", "item_clicks_before")


def is_retrieval(model: str) -> bool:
    return model in RETRIEVAL


class RankingTask:
    folder = "ranking"
    metric = "auc"

    def __init__(self, data_dir: str | Path, seq_len: int = 0, new_user_max_clicks: int = 2,
                 cold_item_max_clicks: int = 2):
        self.batcher = RankingBatcher.from_dir(data_dir, seq_len=seq_len or None)
        self.thresholds = {"new_user_max_clicks": new_user_max_clicks, "cold_item_max_clicks": cold_item_max_clicks}

    @property
    def spec(self):
        return self.batcher.spec

    def build(self, name: str, params: dict | None = None, tiny: bool = False) -> nn.Module:
        return build_model(name, self.spec, params, tiny=tiny)

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: Any = "cpu",
                 amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        return ranking_metrics(predict_ranking(model, batches, device, amp_dtype, STATE_COLUMNS), **self.thresholds)


class RetrievalTask:
    folder = "retrieval"

    def __init__(self, data_dir: str | Path, seq_len: int = 0, k: int = 50):
        self.catalogue = Catalogue.from_dir(data_dir)
        self.batcher = RetrievalBatcher.from_dir(data_dir, seq_len=seq_len or None, logq=self.catalogue.logq)
        self.k = k
        self.metric = f"hr_{k}"

    @property
    def spec(self):
        return self.batcher.spec

    def build(self, name: str, params: dict | None = None, tiny: bool = False) -> nn.Module:
        if name == "karma":
            from models import make_config
            from models.karma import KARMAConfig

            cfg = make_config(KARMAConfig, params, "model.params (karma)") if params or not tiny else KARMAConfig.tiny()
            return karma_for(cfg, self.catalogue, self.batcher.seq_len)
        return build_model(name, self.spec, params, tiny=tiny)

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: Any = "cpu",
                 amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        return evaluate_retrieval(model, batches, self.catalogue, self.k, device)


def karma_for(cfg, cat: Catalogue, max_history: int) -> nn.Module:
    """KARMA over a catalogue: its titles, train-vocabulary IDs and release times travel in the
    weights (with text_encoder = "features" also the frozen MiniLM vectors of its raw titles)."""
    from models.karma import KARMA

    feats = None
    if cfg.text_encoder == "features":
        from models.text import sentence_features

        feats = sentence_features([str(t) for t in cat.title_text])
    return KARMA(cfg, cat.titles, max_history=max_history, text_features=feats,
                 item_idx=torch.as_tensor(cat.features["item_idx"]), released=torch.as_tensor(cat.released))


def make_task(model: str, data_dir: str | Path, seq_len: int = 0, retrieval_k: int = 50, new_user_max_clicks: int = 2,
              cold_item_max_clicks: int = 2) -> RankingTask | RetrievalTask:
    if is_retrieval(model):
        return RetrievalTask(data_dir, seq_len, retrieval_k)
    return RankingTask(data_dir, seq_len, new_user_max_clicks, cold_item_max_clicks)


def task_from_config(model: str, data_dir: str | Path, train) -> RankingTask | RetrievalTask:
    """The task for `model` with the knobs of a `TrainConfig`."""
    return make_task(model, data_dir, train.seq_len, train.retrieval_k, train.new_user_max_clicks,
                     train.cold_item_max_clicks)


def evaluate_split(task: RankingTask | RetrievalTask, model: nn.Module, data_dir: str | Path, split: str,
                   batch_size: int = 1024) -> dict[str, float]:
    """`task.evaluate` over a whole split of the ingest output, in this process (no Ray). A model
    trained on an earlier ingest (the registry gate's champion) reads ids past its tables as OOV
    (`FeatureSpec.fit_ids`; the data extended its vocabularies, data.vocab_from)."""
    import pyarrow.dataset as pads

    from models.spec import FeatureSpec

    ds = pads.dataset(str(Path(data_dir) / task.folder / f"split={split}"), format="parquet")
    spec = getattr(model, "spec", None)
    fit = isinstance(spec, FeatureSpec) and isinstance(task, RankingTask)

    def batches():
        for rb in ds.to_batches(batch_size=batch_size):
            if rb.num_rows:
                b = task.batcher({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names})
                yield spec.fit_ids(b) if fit else b

    return task.evaluate(model, batches())
