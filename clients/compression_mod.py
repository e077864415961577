"""``compression_mod`` (pairs with ``strategies.compression.CompressedUpdates``
on the server): decodes a compressed global adapter before the handler sees
it, and turns the train reply into an encoded update: delta = local - global,
plus the error-feedback residual kept in ``context.state`` across rounds,
encoded with the codec the server named in the train config. It is a no-op
for messages whose config names no codec, so it is safe to install always.
Order: privacy mods (clip -> noise) must run inside this one, so encoding
sees the privatised update.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedmm import protocol
from fedmm.compression import (decode_self_describing, encode_with_feedback, make_codec, make_downlink_codec,
                               payload_bytes)
from fedmm.protocol import to_numpy, to_record, trainable

RESIDUAL_KEY = "codec-residual"  # context.state: the error-feedback residual, across rounds


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.has_error() or protocol.CONFIG not in msg.content or protocol.CODEC_DOWN not in protocol.config_in(msg.content):
        return call_next(msg, context)
    config = protocol.config_in(msg.content)
    down = make_downlink_codec(protocol.text(config, protocol.CODEC_DOWN))
    global_arrays = decode_self_describing(down, to_numpy(protocol.arrays_in(msg.content)))
    msg.content[protocol.ARRAYS] = to_record(global_arrays)
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error() or protocol.CODEC_UP not in config:
        return reply

    start = time.perf_counter()
    up = make_codec(protocol.text(config, protocol.CODEC_UP))
    local = to_numpy(protocol.arrays_in(reply.content))
    # the reply holds the trainable keys; downlink-only ones stay with the server
    delta = OrderedDict((k, local[k] - v) for k, v in trainable(global_arrays).items())
    # seeded by the client's partition where it has one: Flower draws node ids at random, so a run seeded by
    # them would not be reproducible (stochastic rounding is no secret: it hides nothing)
    client = protocol.partition_id_of(context.node_config, context.node_id)
    seed = [protocol.integer(config, protocol.CODEC_SEED, 0), protocol.integer(config, protocol.SERVER_ROUND, 0), client]
    rng = np.random.default_rng(seed)
    residual = None
    feedback = bool(config.get(protocol.ERROR_FEEDBACK, False)) and not up.lossless  # fp32 leaves no error
    if feedback and RESIDUAL_KEY in context.state:
        stored = to_numpy(protocol.arrays_in(context.state, RESIDUAL_KEY))
        if list(stored) == list(delta) and all(stored[k].shape == delta[k].shape for k in delta):
            residual = stored  # else: the adapter changed shape; start afresh
    if feedback:
        payload, new_residual = encode_with_feedback(up, delta, residual, rng)
        context.state[RESIDUAL_KEY] = to_record(new_residual)
    else:
        payload = up.encode(delta, rng)
    reply.content[protocol.ARRAYS] = to_record(payload)
    metrics = protocol.metrics_in(reply.content)
    metrics[protocol.BYTES_UPLINK] = payload_bytes(payload)
    metrics[protocol.ENCODE_SECONDS] = time.perf_counter() - start
    return reply
