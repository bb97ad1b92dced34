"""The system message a data set trains under, when every example shares one."""

from __future__ import annotations

from collections.abc import Iterable

from .types import Conversation, Example


def _leading_system(example: Example) -> str | None:
    messages = example.messages if isinstance(example, Conversation) else example.prompt
    if messages and messages[0].role == "system":
        return messages[0].content
    return None


def common_system_prompt(examples: Iterable[Example], default: str | None = None) -> str | None:
    """The system message every example is rendered with, or None when examples differ or some have none.

    `default` is `data.system_prompt`: the renderer puts it in front of examples without a system message,
    so those examples count as carrying it. A model trained this way learned the task under that message
    only; serving must send it too."""
    found: str | None = None
    for example in examples:
        own = _leading_system(example)
        text = own if own is not None else default
        if not text or (found is not None and text != found):  # "" renders no system turn: nothing to send
            return None
        found = text
    return found
