"""Registry of training methods (plug-ins to the one engine)."""
from __future__ import annotations

from .base import Method


def method_class(name: str) -> type[Method]:
    from .moco import MoCo
    from .rotation import Rotation
    from .supervised import ClassifierRetraining, Supervised
    registry = {m.name: m for m in (Supervised, ClassifierRetraining, Rotation, MoCo)}
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(registry)}")
    return registry[name]
