"""Build the FAISS index of a registered retrieval model and log it with that model version.

The index goes into the version's own MLflow run as `index/` (index.faiss + index.json
naming the model version and the factory string); the version gets `index.*` tags. The
Serve retriever loads that index when it matches the version it serves, else builds one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from configs import FunnelConfig
from serving.index import IndexParams, ItemIndex


def build_index(model, data_dir: str | Path, factory: str) -> ItemIndex:
    from training.retrieval import Catalogue, item_vectors

    vecs = item_vectors(model, Catalogue.from_dir(data_dir)).numpy()
    return ItemIndex(vecs.shape[1], IndexParams(factory)).build(np.arange(1, len(vecs) + 1), vecs)


def build_and_log_index(cfg: FunnelConfig, alias: str = "challenger", data_dir: str | None = None) -> dict[str, Any]:
    import mlflow

    from training.registry import load_model, registered_name, setup_tracking

    setup_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    name = registered_name(cfg.serve.retriever)
    mv = client.get_model_version_by_alias(name, alias)
    model = load_model(f"models:/{name}/{mv.version}")
    t0 = time.time()
    index = build_index(model, data_dir or cfg.data.output, cfg.serve.index_factory)
    seconds = time.time() - t0
    meta = {"model": name, "model_version": str(mv.version), "build_s": seconds}
    with tempfile.TemporaryDirectory() as d:
        index.save(Path(d) / "index", meta)
        client.log_artifacts(mv.run_id, str(Path(d) / "index"), artifact_path="index")
    for k, v in {"factory": cfg.serve.index_factory, "ntotal": index.ntotal, "artifact": "index/"}.items():
        client.set_model_version_tag(name, mv.version, f"index.{k}", str(v))
    return {**meta, "factory": cfg.serve.index_factory, "ntotal": index.ntotal, "run_id": mv.run_id}


def load_logged_index(run_id: str, version: str) -> ItemIndex | None:
    """The index logged with this model version, or None when there is none (or another version's)."""
    import json

    import mlflow

    try:
        folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/index"))
    except Exception:  # no index logged for this run
        return None
    meta = json.loads((folder / "index.json").read_text())
    return ItemIndex.load(folder) if meta.get("model_version") == str(version) else None


def index_for_version(model, run_id: str, version: str, data_dir: str | Path, factory: str) -> ItemIndex:
    """The index logged with this model version, else one built now from the model's item embeddings."""
    index = load_logged_index(run_id, version)
    return index if index is not None else build_index(model, data_dir, factory)
