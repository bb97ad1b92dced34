"""The run config: the typed schema (`schema`), the checks across fields and stages (`checks`), and loading
(`load`: YAML, `--set` overrides, one validation pass that lists every problem)."""

from .load import apply_overrides, dump_config, load_config, parse_config, parse_section, validated
from .schema import (
    METHOD_ARGS,
    AdapterConfig,
    AdapterKind,
    DataConfig,
    EvalConfig,
    Method,
    MethodConfig,
    RewardConfig,
    RunConfig,
    Section,
    StageConfig,
    TrainConfig,
    stage_config,
)

__all__ = ["METHOD_ARGS", "AdapterConfig", "AdapterKind", "DataConfig", "EvalConfig", "Method", "MethodConfig",
           "RewardConfig", "RunConfig", "Section", "StageConfig", "TrainConfig", "apply_overrides", "dump_config",
           "load_config", "parse_config", "parse_section", "stage_config", "validated"]
