"""Serve several adapters over one base model loaded once, switching between them per request."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import TunesmithError
from .adapters import _check_adapter_dir, _verify_loaded, peft_wrap
from .quantize import keep_4bit_layout


class AdapterSet:
    """One base model, any number of named PEFT adapters, one active at a time (or none: the plain base).

    The base model is wrapped in place by the first `add`; after that use `model` (a PeftModel) for
    inference. Adapters are frozen; switching is cheap (no weights move)."""

    def __init__(self, base_model: nn.Module):
        keep_4bit_layout(base_model)
        self._base = base_model
        self._model: nn.Module | None = None
        self._names: list[str] = []
        self._active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def active(self) -> str | None:
        return self._active

    @property
    def model(self) -> nn.Module:
        """The PeftModel holding every adapter (the plain base before the first `add`)."""
        return self._model if self._model is not None else self._base

    def add(self, name: str, adapter_dir: str | Path) -> None:
        """Load the adapter in `adapter_dir` under `name`. The active adapter does not change."""
        from peft import PeftModel

        if not name or name in self._names:
            raise TunesmithError(f"adapter name '{name}' is empty or already used",
                                 f"pick a new name; loaded: {', '.join(self._names) or 'none'}")
        path = _check_adapter_dir(adapter_dir)
        try:
            if self._model is None:
                with peft_wrap():
                    self._model = PeftModel.from_pretrained(self._base, str(path), adapter_name=name)
            else:
                self._model.load_adapter(str(path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            raise TunesmithError(f"adapter {path} does not fit this base model: {str(e).splitlines()[0]}",
                                 "every adapter in a set must be trained on the same base model") from None
        _verify_loaded(self._model, path, name)
        self._names.append(name)
        self.use(self._active)  # loading must not change which adapter answers

    def use(self, name: str | None) -> None:
        """Route the next forward passes through adapter `name`, or through the plain base for None."""
        if name is not None and name not in self._names:
            raise TunesmithError(f"no adapter named '{name}'", f"loaded: {', '.join(self._names) or 'none'}")
        self._active = name
        if self._model is None:
            return
        if name is None:
            self._model.base_model.disable_adapter_layers()
        else:
            self._model.base_model.enable_adapter_layers()
            self._model.set_adapter(name, inference_mode=True)
        self._model.eval()
