"""Every RBLN model class by name, whatever was imported before.

A class registers when its class statement runs (`RBLNModel.__init_subclass__`). Lookups first
import our classes from the static tables of optimum_npu/__init__.py, so that an answer never
depends on what was imported before; classes defined elsewhere (a user's own family) are found
once defined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import RBLNModel

MODEL_REGISTRY: dict[str, type[RBLNModel]] = {}


def model_class_named(name: str) -> type[RBLNModel] | None:
    """The RBLN model class called `name` (as rbln_config.json records it), or None."""
    import optimum_npu

    from .base import RBLNModel

    if name in optimum_npu._EXPORTS:
        found = getattr(optimum_npu, name)
        return found if isinstance(found, type) and issubclass(found, RBLNModel) else None
    return MODEL_REGISTRY.get(name)


def model_classes(model_type: str | None = None) -> list[type[RBLNModel]]:
    """The RBLN model classes that compile checkpoints (those with an hf_class), the static table's
    first in its order (the default class of a model_type before its variants), then classes defined
    elsewhere; only those of `model_type` if given."""
    import optimum_npu

    names = [n for mt, ns in optimum_npu.MODEL_TYPES.items() if model_type in (None, mt) for n in ns]
    ours = [model_class_named(n) for n in names]
    others = [c for c in MODEL_REGISTRY.values() if c not in ours and c.hf_class is not None
              and model_type in (None, c.hf_model_type())]
    return ours + others
