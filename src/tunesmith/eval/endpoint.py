"""The eval's name for the chat completions client, which lives in `tunesmith.model.endpoint` (below training,
so that the `judge:` reward of online training uses the same client and retry rules)."""

from tunesmith.model.endpoint import (
    MAX_RETRY_AFTER,
    ChatEndpoint,
    EndpointError,
    Reply,
    api_key,
    chat_completions_url,
    retry_after,
    split_endpoint,
)

__all__ = ["MAX_RETRY_AFTER", "ChatEndpoint", "EndpointError", "Reply", "api_key", "chat_completions_url",
           "retry_after", "split_endpoint"]
