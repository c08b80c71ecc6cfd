"""Typed run configuration: schema, YAML/CLI loading, world-size validation."""

from megatron_ct.config.loader import config_to_dict, load_config, parse_overrides
from megatron_ct.config.schema import (
    CheckpointConfig,
    ConfigError,
    CTConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_ct.config.validate import Layout, validate_for_world

__all__ = [
    "CTConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "OptimConfig",
    "DataConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ConfigError",
    "Layout",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "validate_for_world",
]
