"""Configuration: YAML and ``key=value`` overrides to validated dataclasses, checked before any
model is loaded or any step is trained; a problem is a one-line :class:`deftx.errors.ConfigError`
naming the key (e.g. ``language_sft.selection.density: must be in (0, 1], got 1.5``).

``schema``: the dataclasses of a pipeline run and their rules; ``loading``: the one merge rule, the
one either-or rule (rank/energy, density/k), typed coercion. Presets are YAML files in
``deftx/presets/``. Nothing here imports torch (tests/test_architecture.py checks it).
"""

from deftx.config.loading import (
    EXCLUSIVE,
    apply_overrides,
    clear_alternatives,
    fail,
    from_dict,
    merge,
    parse_override,
    preset_names,
    preset_summary,
    read_preset,
    read_yaml,
    to_dict,
)
from deftx.config.schema import (
    BACKENDS,
    DATASETS,
    METHODS,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    PhaseConfig,
    PipelineConfig,
    SelectionConfig,
    SFTConfig,
    TrackingConfig,
    load_pipeline_config,
)
from deftx.errors import ConfigError

__all__ = ["BACKENDS", "ClusterConfig", "ConfigError", "DATASETS", "DataConfig", "EXCLUSIVE", "METHODS", "ModelConfig", "PhaseConfig", "PipelineConfig", "SFTConfig", "SelectionConfig", "TrackingConfig", "apply_overrides", "clear_alternatives", "fail", "from_dict", "load_pipeline_config", "merge", "parse_override", "preset_names", "preset_summary", "read_preset", "read_yaml", "to_dict"]
