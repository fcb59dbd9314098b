"""Funnel's models: pure PyTorch (no Ray, no MLflow). Build one with `build_model`.

The package itself imports nothing heavy: `from models import build_model` loads the registry
(and torch) on first use, while `models.configs` and `models.spec` stay torch-free, so the typed
config and the feature statistics load in a data worker without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RANKING": "models.registry", "build_model": "models.registry", "make_config": "models.registry",
    "loss_terms": "models.losses", "total_loss": "models.losses", "ModelOutput": "models.layers",
    "FeatureSpec": "models.spec", "KARMA": "models.karma", "KARMAConfig": "models.configs",
    "TwoTower": "models.two_tower", "TwoTowerConfig": "models.configs", "AdaF2M2": "models.adaf2m2",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
