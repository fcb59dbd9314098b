"""Search spaces over the papers' knobs (plus the learning rate), as flat Tune dicts.

Keys are "lr" or "params.<path>" into the model's params (dots for nesting), so a trial's
config maps onto the same `--params` the training job takes.
"""

from __future__ import annotations

from typing import Any


def space(model: str) -> dict[str, Any]:
    from ray import tune

    lr = {"lr": tune.loguniform(1e-4, 1e-2)}
    if model == "cdnet":
        return lr | {"params.topk_ratio": tune.uniform(0.02, 1.0), "params.bins": tune.choice([5, 10, 20, 40])}
    if model == "lrea":
        return lr | {"params.rank": tune.choice([8, 16, 32, 64, 128]), "params.lam": tune.loguniform(0.01, 1.0)}
    if model.startswith("adaf2m2:"):
        return lr | {"params.adaf2m2.alpha": tune.uniform(0.0, 1.0)}
    if model == "karma":
        return lr | {"params.lam_dec": tune.uniform(0.0, 2.0)}
    raise ValueError(f"no search space for {model!r}; tunable: cdnet, lrea, adaf2m2:<base>, karma")


def knobs(model: str) -> list[str]:
    return [k for k in space(model) if k != "lr"]


def to_params(trial: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"params.a.b": 1} → {"a": {"b": 1}}, merged over `base`."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    for key, v in trial.items():
        if not key.startswith("params."):
            continue
        node = out
        parts = key.split(".")[1:]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out
