"""Typed configuration (see configs/schema.py) and the YAML presets beside it."""

from configs.schema import (
    ABTestConfig,
    ConfigError,
    DataConfig,
    FunnelConfig,
    ModelConfig,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    WorldConfig,
    flatten,
    load_config,
    parse_override,
    to_dict,
)

__all__ = [
    "ABTestConfig",
    "ConfigError",
    "DataConfig",
    "FunnelConfig",
    "ModelConfig",
    "ServeConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "WorldConfig",
    "flatten",
    "load_config",
    "parse_override",
    "to_dict",
]
