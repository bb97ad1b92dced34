"""tunesmith: fine-tune open language models on your own data, and prove the result was worth it."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# bitsandbytes announces on import that it cannot fetch an optional CPU kernel from a model hub; tunesmith never
# asks for it (and offline machines cannot fetch it), so the message is noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .api import (  # noqa: E402
    ChatModel,
    EvalConfig,
    EvalResult,
    Plan,
    Run,
    RunConfig,
    check_data,
    evaluate,
    export_run,
    load_config,
    open_adapters,
    open_model,
    parse_config,
    plan,
    push,
    train,
)

__all__ = ["ChatModel", "EvalConfig", "EvalResult", "Plan", "Run", "RunConfig", "__version__", "check_data",
           "evaluate", "export_run", "load_config", "open_adapters", "open_model", "parse_config", "plan", "push",
           "train"]
