"""What a client sends back when it does not train: a reply that says why (the server logs and reports it)."""

from __future__ import annotations

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode


def decline(msg: Message, reason: str) -> Message:
    """A reply that says why this client does not train this round (the server logs and reports it)."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
