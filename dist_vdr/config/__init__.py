"""Typed recipe configuration: YAML files + ``key=value`` overrides, validated when loaded.

OmegaConf does the parsing and merging against the dataclass schema below (unknown keys and wrong
types are rejected there); ``__post_init__`` checks the values; :func:`load_config` turns every
failure into a ``ValueError`` that names the key and the fix. Checks that need the launch (world
size) or the model (embedding dimension) or the data (columns) live in :meth:`Config.resolve_batch`,
:func:`dist_vdr.models.build.check_dims` and :mod:`dist_vdr.data.loading`.
"""

from __future__ import annotations

from dist_vdr.config.loading import load_config, to_yaml
from dist_vdr.config.model_data import AdapterConfig, DataConfig, DatasetEntry, ModelConfig
from dist_vdr.config.recipe import Config, check_kind_options, recipe_schema
from dist_vdr.config.training import (
    DistillationConfig,
    EvaluationConfig,
    FalseNegativesConfig,
    LaunchConfig,
    LossConfig,
    MiningConfig,
    TrainingConfig,
)
from dist_vdr.config.values import DEVICES, DTYPES, REQUIRED, TRACKERS, check_choice

__all__ = [
    "AdapterConfig", "Config", "DEVICES", "DTYPES", "DataConfig", "DatasetEntry", "DistillationConfig",
    "EvaluationConfig", "FalseNegativesConfig", "LaunchConfig", "LossConfig", "MiningConfig", "ModelConfig",
    "REQUIRED", "TRACKERS", "TrainingConfig", "check_choice", "check_kind_options", "load_config", "recipe_schema",
    "to_yaml",
]
