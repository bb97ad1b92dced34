"""tunesmith: fine-tune open language models on your own data, and prove the result was worth it."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import (  # noqa: E402
    ChatModel,
    EvalResult,
    Run,
    RunConfig,
    evaluate,
    load_config,
    open_adapters,
    open_model,
    parse_config,
    train,
)

__all__ = ["ChatModel", "EvalResult", "Run", "RunConfig", "__version__", "evaluate", "load_config", "open_adapters",
           "open_model", "parse_config", "train"]
