"""Typed, strictly loaded configuration (see schema.py for every default)."""

from pipeline.config.loader import (
    config_diff,
    config_from_dict,
    config_to_dict,
    dump_config,
    flatten,
    load_config,
    save_config,
)
from pipeline.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    LaunchConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    redact_text,
    redact_uri,
    refuse_uri_credentials,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "LaunchConfig",
    "ModelConfig",
    "OptimConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "flatten",
    "load_config",
    "redact_text",
    "redact_uri",
    "refuse_uri_credentials",
    "save_config",
]
