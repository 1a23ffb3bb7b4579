"""The run's typed configuration: one dataclass per stage, loaded from YAML, checked by pydantic.

Defaults are the paper's (sections 3.2-3.6, 4.1) where it gives one; `configs/demo.yaml` states
where the embedded demo departs from them and why. Every field declares the stages whose output it
decides (`invalidation`), and each stage's cache key holds exactly those fields' values (see
`m3po_core.stages.runner.stage_config`), so changing a setting recomputes exactly the stages it decides.

One concern per module: `sections` (the dataclasses, each field with its help), `loading` (pydantic
over those dataclasses; YAML, dicts, overrides), `checks` (ranges and rules across sections),
`invalidation` (each field's stages), `describe` (every key with its type, default, meaning and
stages: `m3po config`). This package only re-exports their public names; importers use
`from m3po_core.config import ...`.
"""
from m3po_core.config.checks import batch_split, check_ipa, validate
from m3po_core.config.describe import describe
from m3po_core.config.loading import CONFIG_DIR, DEFAULT_CONFIG, config_from_dict, load_config, parse_override
from m3po_core.config.sections import (
    BENCHMARKS,
    PUBLIC_BENCHMARKS,
    ClipConfig,
    DataConfig,
    DataSourceConfig,
    EncoderSpec,
    EvaluationConfig,
    ExecutionConfig,
    IPAConfig,
    JudgeSpec,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    ScoringConfig,
    SelectionConfig,
    TrainingConfig,
    WorldConfig,
)
from m3po_core.data.quality import QualityFilterConfig
from m3po_core.errors import ConfigError

__all__ = [
    "BENCHMARKS", "CONFIG_DIR", "DEFAULT_CONFIG", "PUBLIC_BENCHMARKS", "ClipConfig", "ConfigError", "DataConfig",
    "DataSourceConfig", "EncoderSpec", "EvaluationConfig", "ExecutionConfig", "IPAConfig", "JudgeSpec",
    "ModelConfig", "QualityFilterConfig", "RunConfig", "SamplingConfig", "ScoringConfig", "SelectionConfig",
    "TrainingConfig", "WorldConfig", "batch_split", "check_ipa", "config_from_dict", "describe", "load_config",
    "parse_override", "validate",
]
