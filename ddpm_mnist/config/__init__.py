"""Typed config: the schema (`schema.py`), strict YAML (`yaml_io.py`), loading and overrides
(`loading.py`) and the rules between keys (`rules.py`). Import from here."""

from ddpm_mnist.config.loading import (
    MAX_CONFIG_BYTES,
    apply_overrides,
    config_from_dict,
    load_config,
    with_sample_options,
)
from ddpm_mnist.config.rules import check_trainable, duration_seconds, validate
from ddpm_mnist.config.schema import (
    FIXED_VARIANCE_TYPES,
    GUIDANCE_DEFAULT,
    IMAGE_SIZE,
    LEARNED_VARIANCE_TYPES,
    MOVED_KEYS,
    PREDICTION_TYPES,
    SAMPLE_TIME_KEYS,
    SCHEDULES,
    SECTIONS,
    SIGMA_SCHEDULES,
    TIMESTEP_SPACINGS,
    VARIANCE_TYPES,
    Config,
    DataConfig,
    ModelConfig,
    RuntimeConfig,
    SampleConfig,
    SampleRequest,
    ScheduleConfig,
    TrainConfig,
    param,
    to_dict,
)
from ddpm_mnist.config.yaml_io import MAX_DEPTH, dump_yaml, parse_yaml, reference_rows

__all__ = [
    "FIXED_VARIANCE_TYPES", "GUIDANCE_DEFAULT", "IMAGE_SIZE", "LEARNED_VARIANCE_TYPES", "MAX_CONFIG_BYTES",
    "MAX_DEPTH", "MOVED_KEYS", "PREDICTION_TYPES", "SAMPLE_TIME_KEYS", "SCHEDULES", "SECTIONS", "SIGMA_SCHEDULES",
    "TIMESTEP_SPACINGS", "VARIANCE_TYPES", "Config", "DataConfig", "ModelConfig",
    "RuntimeConfig", "SampleConfig", "SampleRequest", "ScheduleConfig", "TrainConfig", "apply_overrides",
    "check_trainable",
    "config_from_dict", "dump_yaml", "duration_seconds", "load_config", "param", "parse_yaml", "reference_rows",
    "to_dict", "validate", "with_sample_options",
]
