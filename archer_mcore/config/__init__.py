"""One typed config tree, loaded from YAML.

Every section is a dataclass with defaults for every field (`schema`). Loading
(`load`) checks each key and value against the dataclass: an unknown key, a wrong
type or an out-of-range value raises `ConfigError` naming the file and the dotted key;
then the checks across fields run (`checks`). `algorithm.name` loads a recipe (the
papers' recipes, YAML files in config/recipes/, see `config.algorithm`) whose fields
the YAML may then override one by one. Importing this package loads PyYAML, not torch.
"""

from __future__ import annotations

from archer_mcore.config.algorithm import (
    BUILTIN_TOKEN_RULES,
    AlgorithmConfig,
    ArcherRuleConfig,
    ConfigDeprecationWarning,
    ForkingRuleConfig,
    NoneRuleConfig,
    TokenRuleConfig,
    algorithm_recipe,
    recipe_names,
)
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
    "BUILTIN_TOKEN_RULES",
    "AlgorithmConfig",
    "ArchConfig",
    "ArcherRuleConfig",
    "CheckpointConfig",
    "Config",
    "ConfigDeprecationWarning",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ForkingRuleConfig",
    "KernelsConfig",
    "MetricsConfig",
    "ModelConfig",
    "NoneRuleConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RewardsConfig",
    "RolloutConfig",
    "SGLangConfig",
    "SlurmConfig",
    "SyntheticTaskConfig",
    "TokenRuleConfig",
    "TrainConfig",
    "WarmstartConfig",
    "algorithm_recipe",
    "apply_overrides",
    "check_context_parallel",
    "check_position_limit",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "recipe_names",
    "set_dotted",
    "to_dict",
    "validate_config",
]
