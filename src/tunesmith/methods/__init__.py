"""Training methods. Each is a small object implementing `methods.base.Method`; `METHODS` is the registry
(one entry per `method:` name) that the recipe and the contract test (tests/test_method_contract.py) use."""

from __future__ import annotations

from collections.abc import Callable

from ..config import MethodConfig
from ..errors import TunesmithError
from .base import Method, MethodBase, Split
from .cpt import CPT
from .grpo import GRPO
from .preference import DPO, IPO, KTO, ORPO, SimPO
from .sft import SFT

METHODS: dict[str, Callable[[MethodConfig], Method]] = {
    "sft": lambda args: SFT(),
    "cpt": lambda args: CPT(),
    "dpo": DPO,
    "ipo": IPO,
    "orpo": ORPO,
    "simpo": SimPO,
    "kto": KTO,
    "grpo": GRPO,
}


def get_method(name: str, args: MethodConfig | None = None) -> Method:
    if name not in METHODS:
        raise TunesmithError(f"unknown training method '{name}'", f"choose one of: {', '.join(METHODS)}")
    return METHODS[name](args or MethodConfig())


__all__ = ["CPT", "METHODS", "Method", "MethodBase", "SFT", "Split", "get_method"]
