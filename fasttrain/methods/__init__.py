"""Registry of training methods (plug-ins to the one engine).

`METHODS` names every method and where it lives; `fasttrain.config` validates `--method` against it without
importing the methods (which import models, data and losses), so the import graph has no circle.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method

METHODS = {"supervised": ("fasttrain.methods.supervised", "Supervised"),
           "crt": ("fasttrain.methods.supervised", "ClassifierRetraining"),
           "rotation": ("fasttrain.methods.rotation", "Rotation"),
           "moco": ("fasttrain.methods.moco", "MoCo")}


def check_method(name: str) -> None:
    """A ValueError naming the valid methods unless `name` is one of them (imports no method)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")


def method_class(name: str) -> type[Method]:
    check_method(name)
    module, attr = METHODS[name]
    return getattr(import_module(module), attr)
