"""Training methods. Each is a small object implementing `methods.base.Method`."""

from __future__ import annotations

from ..config import MethodConfig
from .base import Method
from .cpt import CPT
from .sft import SFT


def get_method(name: str, args: MethodConfig | None = None) -> Method:
    args = args or MethodConfig()
    if name == "sft":
        return SFT()
    if name == "cpt":
        return CPT()
    from . import preference

    return preference.build(name, args)


__all__ = ["CPT", "Method", "SFT", "get_method"]
