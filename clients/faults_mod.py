"""``fault_injection_mod`` (tests and benchmarks; ``fedmm.faults``): with
``inject-faults`` in the run config, the clients it picks crash, time out or
send a NaN, sign-flipped, scaled or noise update. It sits between
compression and privacy: a Byzantine client sends what it likes, past any
clipping, but still in the wire format. With secure aggregation a client
may vanish at one of its stages instead. A no-op without ``inject-faults``.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from clients.settings import run_settings
from fedmm import protocol
from fedmm.faults import corrupt_update, fault_of
from fedmm.protocol import to_numpy, to_record


def _stage_fault(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A secure-aggregation stage: a ``vanish-<stage>`` client crashes there (it trained and shared keys)."""
    record = protocol.config_in(msg.content, protocol.SECAGG) if protocol.SECAGG in msg.content else ConfigRecord()
    kind = _fault(context, protocol.integer(record, protocol.SA_ROUND, 0))
    if kind == f"vanish-{record.get(protocol.SA_STAGE)!s}":
        raise RuntimeError(f"injected fault: {kind} (round {record.get(protocol.SA_ROUND)!r})")
    return call_next(msg, context)


def _fault(context: Context, server_round: int) -> str | None:
    settings = run_settings(context)
    client = protocol.partition_id_of(context.node_config, context.node_id)
    return fault_of(settings.fault_fractions, client, int(context.node_config.get(protocol.NODE_NUM_PARTITIONS, 1)),
                    settings.seed, server_round)


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if not context.run_config.get("inject-faults"):
        return call_next(msg, context)
    if msg.metadata.message_type == protocol.SECAGG_STAGES:
        return _stage_fault(msg, context, call_next)
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    settings = run_settings(context)
    server_round = protocol.integer(protocol.config_in(msg.content), protocol.SERVER_ROUND, 0) \
        if protocol.CONFIG in msg.content else 0
    kind = _fault(context, server_round)
    if kind is None or kind.startswith("vanish-"):
        return call_next(msg, context)
    if kind == "crash":
        raise RuntimeError(f"injected fault: crash (partition "
                           f"{protocol.partition_id_of(context.node_config, context.node_id)}, round {server_round})")
    if kind == "timeout":
        time.sleep(settings.round_timeout + 5.0)  # the server has stopped waiting for this reply
        return call_next(msg, context)
    reference = to_numpy(protocol.arrays_in(msg.content))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    rng = np.random.default_rng([settings.seed, server_round, int(context.node_id) % 2**32])
    reply.content[protocol.ARRAYS] = to_record(corrupt_update(kind, to_numpy(protocol.arrays_in(reply.content)), reference, rng))
    return reply
