"""ClientApp mods: client-side concerns that wrap any handler.

``compression_mod`` (pairs with ``strategies.compression.CompressedUpdates``
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

from fedmm.compression import encode_with_feedback, layout_from_arrays, make_codec, payload_bytes
from fedmm.lora_keys import is_downlink_only
from strategies.records import to_numpy, to_record

RESIDUAL_KEY = "codec-residual"


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.has_error() or "config" not in msg.content or "codec-down" not in msg.content["config"]:
        return call_next(msg, context)
    config = msg.content["config"]
    down = make_codec(str(config["codec-down"]))
    received = to_numpy(msg.content["arrays"])
    if down.lossless:
        global_arrays = received
    else:
        layout = layout_from_arrays(received)
        payload = {k: v for k, v in received.items() if not k.startswith("layout-")}
        global_arrays = down.decode(payload, layout)
        msg.content["arrays"] = to_record(global_arrays)
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error() or "codec-up" not in config:
        return reply

    start = time.perf_counter()
    up = make_codec(str(config["codec-up"]))
    local = to_numpy(reply.content["arrays"])
    # the reply holds the trainable keys; downlink-only ones (fedmm.lora_keys) stay with the server
    delta = OrderedDict((k, local[k] - global_arrays[k]) for k in global_arrays if not is_downlink_only(k))
    seed = [int(config.get("codec-seed", 0)), int(config.get("server-round", 0)), int(context.node_id)]
    rng = np.random.default_rng(seed)
    residual = None
    feedback = bool(config.get("error-feedback", False)) and not up.lossless  # fp32 leaves no error
    if feedback and RESIDUAL_KEY in context.state:
        stored = to_numpy(context.state[RESIDUAL_KEY])
        if list(stored) == list(delta) and all(stored[k].shape == delta[k].shape for k in delta):
            residual = stored  # else: the adapter changed shape; start afresh
    if feedback:
        payload, new_residual = encode_with_feedback(up, delta, residual, rng)
        context.state[RESIDUAL_KEY] = to_record(new_residual)
    else:
        payload = up.encode(delta, rng)
    reply.content["arrays"] = to_record(payload)
    metrics = reply.content["metrics"]
    metrics["bytes-uplink"] = payload_bytes(payload)
    metrics["encode-seconds"] = time.perf_counter() - start
    return reply
