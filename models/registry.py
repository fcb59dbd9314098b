"""The model registry: `build_model(name, spec, params)` and the ranking models by name."""

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


def _two_tower(name: str, spec: FeatureSpec, params: dict[str, Any], tiny: bool) -> TwoTower:
    """two_tower: params = TwoTowerConfig; adaf2m2:two_tower: {"base": {...}, "adaf2m2": {...}},
    both parts fields of TwoTowerConfig (the AdaF2M2 towers live in the two-tower file)."""
    if name == "two_tower":
        cfg = make_config(TwoTowerConfig, params, "model.params (two_tower)") if params or not tiny else TwoTowerConfig.tiny()
        if cfg.adaf2m2:
            raise ValueError("two_tower: use the model name adaf2m2:two_tower for AdaF2M2 towers")
        return TwoTower(spec, cfg)
    unknown = sorted(set(params) - {"base", "adaf2m2"})
    if unknown:
        raise ValueError(f"model.params: unknown key(s) {unknown} for {name}; use 'base' and 'adaf2m2'")
    base = dict(params.get("base") or ({} if not tiny else vars(TwoTowerConfig.tiny())))
    merged = base | dict(params.get("adaf2m2") or {}) | {"adaf2m2": True}
    return TwoTower(spec, make_config(TwoTowerConfig, merged, f"model.params ({name})"))


def build_model(name: str, spec: FeatureSpec, params: dict[str, Any] | None = None, tiny: bool = False) -> nn.Module:
    """`name` is a ranking model ("cdnet", "dlf", "dcnv2", "din", "mean_pool", "lrea",
    "sim_hard"), "adaf2m2:<base>", or the retrieval model "two_tower" / "adaf2m2:two_tower"
    (KARMA needs the item catalogue: `training.tasks`); `params` is its config (for
    AdaF2M2: {"base": {...}, "adaf2m2": {...}})."""
    params = dict(params or {})
    if name in ("two_tower", "adaf2m2:two_tower"):
        return _two_tower(name, spec, params, tiny)
    if name.startswith("adaf2m2:"):
        base_name = name.split(":", 1)[1]
        base = build_model(base_name, spec, params.pop("base", None), tiny)  # its output bias starts at logit(rate)
        ada = params.pop("adaf2m2", None)
        if params:
            raise ValueError(f"model.params: unknown key(s) {sorted(params)} for {name}; use 'base' and 'adaf2m2'")
        cfg = make_config(AdaF2M2Config, ada, "model.params.adaf2m2") if ada or not tiny else AdaF2M2Config.tiny()
        return AdaF2M2(base, spec, cfg)
    if name not in RANKING:
        raise ValueError(f"unknown model {name!r}; known: {sorted(RANKING)}, adaf2m2:<base>, two_tower, karma")
    cls = RANKING[name]
    cfg = make_config(cls.Config, params, f"model.params ({name})") if params or not tiny else cls.Config.tiny()
    model = cls(spec, cfg)
    if spec.label_rate is not None:
        model.init_output_bias(spec.label_rate)
    return model
