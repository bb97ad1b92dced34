"""tunesmith: fine-tune open language models on your own data, and prove the result was worth it."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import ChatModel, Run, RunConfig, load_config, open_adapters, open_model, parse_config, train  # noqa: E402

__all__ = ["ChatModel", "Run", "RunConfig", "__version__", "load_config", "open_adapters", "open_model",
           "parse_config", "train"]
