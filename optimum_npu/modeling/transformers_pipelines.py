"""Our model classes, listed where transformers' pipelines look for the classes of a task.

A pipeline checks its model's class name against the task's auto mapping (e.g.
`MODEL_FOR_CAUSAL_LM_MAPPING` for "text-generation") and logs a multi-kilobyte "is not
supported" error for any other class, although it then runs it. Registering in the mapping,
keyed by our own config class (never a transformers one, so that `AutoModelForCausalLM` keeps
building transformers' models for transformers' configs), is what the auto classes' `register`
does for custom models; with it the check finds our classes.
"""

from __future__ import annotations

from collections.abc import Iterable


def list_for_pipelines(mapping_name: str, classes: Iterable[type]) -> None:
    """Register `classes` in `transformers.models.auto.modeling_auto.<mapping_name>`, grouped by config class."""
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, mapping_name)
    by_config: dict[type, list[type]] = {}
    for model_class in classes:
        by_config.setdefault(model_class.config_class, []).append(model_class)
    for config_class, group in by_config.items():
        mapping.register(config_class, tuple(group) if len(group) > 1 else group[0], exist_ok=True)
