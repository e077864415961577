"""instruction_check_mod: the server's train and evaluate instructions checked before anything reads them.

The ClientApp treats the server as it treats nothing else it cannot vouch
for: a malformed instruction (a record of the wrong type, a train-config
value of the wrong type or out of range, a codec spec that does not parse)
gets an error reply naming the key and what is wrong, instead of an
exception deep in training. Installed outermost, so every other mod and
handler reads only instructions that passed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from clients.messages import decline, number_problem
from fedmm import protocol
from fedmm.compression import make_codec, make_downlink_codec
from fedmm.config import LOCAL_OPTIMIZERS
from fedmm.config.declare import parses

MAX_STEPS = 10**6  # local steps or batch size beyond this is no honest instruction


def _number(lo: float, hi: float, integer: bool = False) -> Callable[[Any], str | None]:
    return lambda v: number_problem(v, lo, hi, integer=integer)


def _codec(parse: Callable[[str], object]) -> Callable[[Any], str | None]:
    parsed = parses(parse, "a codec spec")
    return lambda v: parsed(v) if isinstance(v, str) else "must be a codec spec string"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


# train/evaluate config key -> check; keys not listed are read by no handler or are checked where read (DP)
CONFIG_CHECKS: dict[str, Callable[[Any], str | None]] = {
    protocol.SERVER_ROUND: _number(0, 2**31 - 1, integer=True),
    protocol.LR: _number(1e-12, 1e3),
    protocol.LOCAL_STEPS: _number(1, MAX_STEPS, integer=True),
    protocol.BATCH_SIZE: _number(1, MAX_STEPS, integer=True),
    protocol.PROXIMAL_MU: _number(0, 1e6),
    protocol.LOCAL_OPTIMIZER: lambda v: None if v in LOCAL_OPTIMIZERS else f"must be one of {', '.join(LOCAL_OPTIMIZERS)}",
    protocol.REPORT_TRAIN_LOSS: _flag,
    protocol.BASE_FINGERPRINT: _text,
    protocol.CODEC_UP: _codec(make_codec),
    protocol.CODEC_DOWN: _codec(make_downlink_codec),
    protocol.CODEC_SEED: _number(0, 2**32 - 1, integer=True),
    protocol.ERROR_FEEDBACK: _flag,
    **{protocol.multiplier_key(c): _number(0, 1e9) for c in protocol.CONSTRAINTS},
}


def instruction_problem(msg: Message) -> str | None:
    """Why the server's instruction cannot be followed, or None."""
    content = msg.content
    if protocol.CONFIG in content and not isinstance(content[protocol.CONFIG], ConfigRecord):
        return f"'{protocol.CONFIG}' holds a {type(content[protocol.CONFIG]).__name__}, expected a ConfigRecord"
    if protocol.ARRAYS not in content:
        return f"no '{protocol.ARRAYS}' record (the global adapter)"
    if not isinstance(content[protocol.ARRAYS], ArrayRecord):
        return f"'{protocol.ARRAYS}' holds a {type(content[protocol.ARRAYS]).__name__}, expected an ArrayRecord"
    config = protocol.config_in(content) if protocol.CONFIG in content else ConfigRecord()
    for key, check in CONFIG_CHECKS.items():
        if key in config:
            problem = check(config[key])
            if problem:
                return f"config '{key}' = {config[key]!r} {problem}"
    return None


def instruction_check_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE) or msg.has_error():
        return call_next(msg, context)
    problem = instruction_problem(msg)
    if problem:
        return decline(msg, f"node {context.node_id}: malformed {msg.metadata.message_type} instruction: {problem}")
    return call_next(msg, context)
