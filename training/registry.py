"""MLflow: tracking runs, the saved-model format, and the registry gate.

Model format (no pickle): a folder with `model.json` (format, model name, its params, the
feature spec) and `weights.safetensors`; `load_model("models:/funnel-<model>@<alias>")`
or a local folder rebuilds the model with `models.build_model` — no training-code globals.
Registered as `funnel-<model>` from the run's artifact folder.

Gate: a new version gets the alias `challenger` only when its test metric beats the
current `champion` of that name on the same split (same dataset fingerprint) and the
current `challenger` (a weaker later run, e.g. a short Tune trial, never displaces a better
candidate); with neither, it becomes challenger. The decision and its numbers are written
as version tags.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights

from configs import FunnelConfig, TrackingConfig, flatten, to_dict
from models import build_model
from models.spec import FeatureSpec

FORMAT = "funnel-model/1"


def registered_name(model: str) -> str:
    return "funnel-" + model.replace(":", "-").replace("_", "-")


# --------------------------------------------------------------------------- model folders


def save_model_dir(model: torch.nn.Module, name: str, params: dict | None, spec: FeatureSpec | None,
                   out: str | Path, tiny: bool = False) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.module if hasattr(model, "module") else model
    if name == "karma":  # retrieval: its own constructor, the catalogue travels in the weights
        meta = {"format": FORMAT, "model": name, "params": asdict(model.cfg), "max_history": model.max_history,
                "vocab": model.vocab, "titles_shape": list(model.titles.shape),
                "features_shape": list(model.features.shape) if model.text is None else None,
                "decoder_config": model.decoder.config.to_dict(), "id_vocab": model.id_vocab}
    else:
        meta = {"format": FORMAT, "model": name, "params": params or {}, "tiny": tiny, "spec": asdict(spec)}
    # not sort_keys: the order of the spec's fields is the order of the embedding tokens
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    save_weights(model, str(out / "weights.safetensors"))
    return out


def load_model_dir(path: str | Path) -> torch.nn.Module:
    path = Path(path)
    meta = json.loads((path / "model.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Funnel model folder (format {meta.get('format')!r}, want {FORMAT!r})")
    if meta["model"] == "karma":
        from models.karma import KARMA, KARMAConfig

        cfg = KARMAConfig(**meta["params"])
        feats = torch.zeros(meta["features_shape"]) if meta.get("features_shape") else None
        model = KARMA(cfg, torch.zeros(meta["titles_shape"], dtype=torch.long), meta["max_history"], feats,
                      decoder_config=meta["decoder_config"], vocab=meta["vocab"], id_vocab=meta.get("id_vocab"))
    else:
        spec_d = meta["spec"]
        spec_d["id_fields"] = tuple(spec_d["id_fields"])
        model = build_model(meta["model"], FeatureSpec(**spec_d), meta["params"] or None, tiny=meta.get("tiny", False))
    missing, unexpected = load_weights(model, str(path / "weights.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {meta['model']}: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_model(uri: str) -> torch.nn.Module:
    """A model from `models:/funnel-<model>@<alias>`, `runs:/<id>/model` or a local folder."""
    if Path(uri).is_dir():
        return load_model_dir(uri)
    import mlflow

    return load_model_dir(mlflow.artifacts.download_artifacts(uri))


# --------------------------------------------------------------------------- tracking


def resolve_tracking_uri(uri: str) -> str:
    """A relative SQLite URI made absolute (against the current directory); others unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def is_uri(location: str) -> bool:
    """An artifact location with a scheme (s3://…, file:///…, mlflow-artifacts:/… — the last has
    no "//"), as opposed to a local folder path."""
    import re

    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", location) is not None


def setup_tracking(t: TrackingConfig) -> str:
    """Point MLflow at `t.uri` (SQLite by default) and an experiment whose artifacts go to an
    explicit location (never a cwd-relative ./mlruns). Returns the experiment id."""
    import mlflow

    uri = resolve_tracking_uri(t.uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(t.experiment)
    if exp is not None:
        return exp.experiment_id
    loc = t.artifact_location
    if not is_uri(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)
        loc = Path(loc).resolve().as_uri()
    return mlflow.create_experiment(t.experiment, artifact_location=loc)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_run(cfg: FunnelConfig, model_name: str, params: dict | None, history: list[dict[str, float]],
            final: dict[str, float], data_dir: str | Path, model: torch.nn.Module, spec: FeatureSpec,
            tiny: bool = False) -> str:
    """One MLflow run: the whole typed config as params, metrics per epoch, the dataset
    fingerprint and git commit as tags, feature_spec.json and the model folder as artifacts."""
    import mlflow

    exp = setup_tracking(cfg.tracking)
    data_dir = Path(data_dir)
    spec_json = json.loads((data_dir / "feature_spec.json").read_text())
    with mlflow.start_run(experiment_id=exp, run_name=model_name) as run:
        flat = flatten(to_dict(cfg)) | {f"model.params.{k}": v for k, v in flatten(params or {}).items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()} | {"model.name": model_name})
        for row in history:
            step = int(row.get("epoch", 0))
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and _finite(v)}, step=step)
        mlflow.log_metrics({k: float(v) for k, v in final.items() if _finite(v)})
        mlflow.set_tags({"dataset_fingerprint": spec_json["fingerprint"], "git_commit": git_commit(),
                         "data_dir": str(data_dir), "model": model_name})
        mlflow.log_artifact(str(data_dir / "feature_spec.json"))
        with tempfile.TemporaryDirectory() as d:
            save_model_dir(model, model_name, params, spec, Path(d) / "model", tiny=tiny)
            mlflow.log_artifacts(str(Path(d) / "model"), artifact_path="model")
        return run.info.run_id


def _finite(v: Any) -> bool:
    try:
        return v == v and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- registry gate


def register_with_gate(model_name: str, run_id: str, metric: str = "test_auc",
                       reevaluate: Callable[[str], float] | None = None) -> dict[str, Any]:
    """Register the run's model folder as a new version of funnel-<model>; alias it
    `challenger` only if it beats `champion` (and the current challenger) on `metric`, like
    with like: when the champion was tested on another dataset fingerprint (a daily retrain
    on new logs), `reevaluate(model_uri)` scores the champion on this run's test split and
    the gate compares against that (recorded on the champion as
    `gate.reevaluated.<fingerprint>.<metric>`); without `reevaluate` such a gate refuses."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name = registered_name(model_name)
    run = client.get_run(run_id)
    value = run.data.metrics[metric]
    fp = run.data.tags.get("dataset_fingerprint", "")
    with contextlib.suppress(MlflowException):  # it may exist already
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id)
    decision: dict[str, Any] = {"model": name, "version": int(mv.version), "metric": metric, "value": value,
                                "dataset_fingerprint": fp}
    # to take `challenger` a version must beat the champion and the current challenger
    reasons, replaced = [], []
    for alias in ("champion", "challenger"):
        try:
            other = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            continue
        o_run = client.get_run(other.run_id)
        o_fp = o_run.data.tags.get("dataset_fingerprint", "")
        o_val = o_run.data.metrics.get(metric, float("nan"))
        if o_fp != fp:
            if alias != "champion":
                replaced.append(f"challenger v{other.version} from another dataset ({o_fp})")
                continue  # a challenger from other data is simply replaced
            if reevaluate is None:
                reasons.append(f"champion was tested on another dataset ({o_fp} != {fp}) and no re-evaluation "
                               "was given")
                continue
            tag = f"gate.reevaluated.{fp}.{metric}"
            cached = other.tags.get(tag)
            o_val = float(cached) if cached is not None else float(reevaluate(f"models:/{name}/{other.version}"))
            client.set_model_version_tag(name, other.version, tag, str(o_val))
            decision["champion_reevaluated_on"] = fp
        decision |= {f"{alias}_version": int(other.version), f"{alias}_value": o_val}
        if not value > o_val:
            reasons.append(f"{metric} {value:.5f} <= {alias} {o_val:.5f}")
    if reasons:
        decision |= {"challenger": False, "reason": "; ".join(reasons)}
    else:
        beaten = [f"{a} {decision[a + '_value']:.5f}" for a in ("champion", "challenger") if f"{a}_value" in decision]
        why = f"{metric} {value:.5f} > " + ", ".join(beaten) if beaten else "no champion yet"
        decision |= {"challenger": True, "reason": "; ".join([why, *(f"replaces the {r}" for r in replaced)])}
    if decision["challenger"]:
        client.set_registered_model_alias(name, "challenger", mv.version)
    for k, v in decision.items():
        client.set_model_version_tag(name, mv.version, f"gate.{k}", str(v))
    return decision
