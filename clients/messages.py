"""What a client checks in a server's message, and what it sends back when it does not train.

``number_problem`` is the one check of a number a message carries (the instruction check and the privacy
mod use it); ``decline`` is a reply that says why this client does not train (the server logs and reports it).
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode


def decline(msg: Message, reason: str) -> Message:
    """A reply that says why this client does not train this round (the server logs and reports it)."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def number_problem(value: Any, lo: float, hi: float, *, integer: bool = False, above_lo: bool = False) -> str | None:
    """What is wrong with ``value`` as a finite number in [lo, hi] (lo excluded with ``above_lo``), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "must be a finite number"
    if integer and not float(value).is_integer():
        return "must be an integer"
    if above_lo and value <= lo:
        return f"must be > {lo:g}"
    return None if lo <= value <= hi else f"must be in [{lo:g}, {hi:g}]"
