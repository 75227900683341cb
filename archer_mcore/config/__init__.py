"""One typed config tree, loaded from YAML.

Every section is a dataclass with defaults for every field (`schema`). Loading
(`load`) checks each key and value against the dataclass: an unknown key, a wrong
type or an out-of-range value raises `ConfigError` naming the file and the dotted key;
then the checks across fields run (`checks`). `algorithm.name` selects a preset (the
papers' recipes, see `ALGORITHM_PRESETS`) whose fields the YAML may then override one
by one. Importing this package loads PyYAML, not torch.
"""

from __future__ import annotations

from archer_mcore.config.checks import (
    check_context_parallel,
    check_position_limit,
    validate_config,
)
from archer_mcore.config.errors import ConfigError
from archer_mcore.config.load import (
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
    set_dotted,
    to_dict,
)
from archer_mcore.config.schema import (
    ALGORITHM_PRESETS,
    AlgorithmConfig,
    ArchConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    KernelsConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RewardsConfig,
    RolloutConfig,
    SGLangConfig,
    SlurmConfig,
    SyntheticTaskConfig,
    TrainConfig,
    WarmstartConfig,
)

__all__ = [
    "ALGORITHM_PRESETS",
    "AlgorithmConfig",
    "ArchConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "KernelsConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RewardsConfig",
    "RolloutConfig",
    "SGLangConfig",
    "SlurmConfig",
    "SyntheticTaskConfig",
    "TrainConfig",
    "WarmstartConfig",
    "apply_overrides",
    "check_context_parallel",
    "check_position_limit",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "set_dotted",
    "to_dict",
    "validate_config",
]
