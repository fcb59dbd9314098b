"""Funnel's models: pure PyTorch (no Ray, no MLflow). Build one with `build_model`."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from torch import nn

from models.adaf2m2 import AdaF2M2, AdaF2M2Config
from models.base import RankingModel
from models.cdnet import CDNet
from models.dcnv2 import DCNv2
from models.din import DIN
from models.dlf import DLF
from models.karma import KARMA, KARMAConfig
from models.layers import ModelOutput
from models.losses import loss_terms, total_loss
from models.lrea import LREA
from models.mean_pool import MeanPoolDNN
from models.sim_hard import SIMHard
from models.spec import FeatureSpec
from models.two_tower import TwoTower, TwoTowerConfig

RANKING: dict[str, type[RankingModel]] = {
    "mean_pool": MeanPoolDNN,
    "din": DIN,
    "dcnv2": DCNv2,
    "cdnet": CDNet,
    "dlf": DLF,
    "lrea": LREA,
    "sim_hard": SIMHard,
}


def make_config(cls: type, params: dict[str, Any] | None, where: str) -> Any:
    """A model config dataclass from a dict; an unknown key is an error naming it."""
    params = dict(params or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; {cls.__name__} has {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for k, v in params.items():
        tp = hints[k]
        base = typing.get_origin(tp) or tp
        ok = isinstance(v, base) or (base is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok or (base is int and isinstance(v, bool)):
            raise ValueError(f"{where}.{k}: expected {getattr(tp, '__name__', tp)}, got {v!r}")
    return cls(**params)


def build_model(name: str, spec: FeatureSpec, params: dict[str, Any] | None = None, tiny: bool = False) -> nn.Module:
    """`name` is a ranking model ("cdnet", "dlf", "dcnv2", "din", "mean_pool") or
    "adaf2m2:<base>"; `params` is its config (for AdaF2M2: {"base": {...}, "adaf2m2": {...}})."""
    params = dict(params or {})
    if name.startswith("adaf2m2:"):
        base_name = name.split(":", 1)[1]
        base = build_model(base_name, spec, params.pop("base", None), tiny)
        ada = params.pop("adaf2m2", None)
        if params:
            raise ValueError(f"model.params: unknown key(s) {sorted(params)} for {name}; use 'base' and 'adaf2m2'")
        cfg = make_config(AdaF2M2Config, ada, "model.params.adaf2m2") if ada or not tiny else AdaF2M2Config.tiny()
        return AdaF2M2(base, spec, cfg)
    if name not in RANKING:
        raise ValueError(f"unknown model {name!r}; known: {sorted(RANKING)} and adaf2m2:<base>")
    cls = RANKING[name]
    cfg = make_config(cls.Config, params, f"model.params ({name})") if params or not tiny else cls.Config.tiny()
    return cls(spec, cfg)


__all__ = [
    "KARMA",
    "RANKING",
    "AdaF2M2",
    "FeatureSpec",
    "KARMAConfig",
    "ModelOutput",
    "TwoTower",
    "TwoTowerConfig",
    "build_model",
    "loss_terms",
    "total_loss",
]
