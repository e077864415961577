"""``fault_injection_mod`` (tests and benchmarks; ``fedmm.faults``): with
``inject-faults`` in the run config, the clients it picks crash, time out or
send a NaN, sign-flipped, scaled or noise update. It sits between
compression and privacy: a Byzantine client sends what it likes, past any
clipping, but still in the wire format. A no-op without ``inject-faults``.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from clients.settings import run_settings
from fedmm import protocol
from fedmm.faults import corrupt_update, fault_of
from fedmm.protocol import to_numpy, to_record


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or not context.run_config.get("inject-faults"):
        return call_next(msg, context)
    settings = run_settings(context)
    server_round = int(msg.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0)) if protocol.CONFIG in msg.content else 0
    client = protocol.partition_id_of(context.node_config, context.node_id)
    kind = fault_of(settings.fault_fractions, client, int(context.node_config.get(protocol.NODE_NUM_PARTITIONS, 1)),
                    settings.seed, server_round)
    if kind is None:
        return call_next(msg, context)
    if kind == "crash":
        raise RuntimeError(f"injected fault: crash (partition {client}, "
                           f"round {server_round})")
    if kind == "timeout":
        time.sleep(settings.round_timeout + 5.0)  # the server has stopped waiting for this reply
        return call_next(msg, context)
    reference = to_numpy(msg.content[protocol.ARRAYS])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    rng = np.random.default_rng([settings.seed, server_round, int(context.node_id) % 2**32])
    reply.content[protocol.ARRAYS] = to_record(corrupt_update(kind, to_numpy(reply.content[protocol.ARRAYS]), reference, rng))
    return reply
