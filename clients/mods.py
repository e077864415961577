"""ClientApp mods: client-side concerns that wrap any handler.

``privacy_mod`` (pairs with strategies/privacy.py): client-level DP on the
train reply. With Flower's clipping-norm key in the config (central DP with
client-side clipping) it runs Flower's ``fixedclipping_mod``; with fedmm's
``dp-clip-norm`` / ``dp-noise-std`` (local and distributed DP) it clips the
update to the norm and adds the noise; for local DP it also keeps the
client's epsilon ledger in ``context.state`` and declines the round, with a
reason, once the next release would exceed ``max-epsilon``. A no-op for
messages whose config names none of these, so it is safe to install always.

``compression_mod`` (pairs with ``strategies.compression.CompressedUpdates``
on the server): decodes a compressed global adapter before the handler sees
it, and turns the train reply into an encoded update: delta = local - global,
plus the error-feedback residual kept in ``context.state`` across rounds,
encoded with the codec the server named in the train config. It is a no-op
for messages whose config names no codec, so it is safe to install always.
Order: privacy mods (clip -> noise) must run inside this one, so encoding
sees the privatised update.

``fault_injection_mod`` (tests and benchmarks; ``fedmm.faults``): with
``inject-faults`` in the run config, the clients it picks crash, time out or
send a NaN, sign-flipped, scaled or noise update. It sits between
compression and privacy: a Byzantine client sends what it likes, past any
clipping, but still in the wire format. A no-op without ``inject-faults``.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from flwr.app import ConfigRecord, Error
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmm.config import Settings
from fedmm.faults import corrupt_update, fault_of
from fedmm.compression import decode_self_describing, encode_with_feedback, make_codec, payload_bytes
from fedmm.lora_keys import is_downlink_only
from fedmm.privacy import privatize_update, sample_epsilon, update_norm
from strategies import privacy as dp_keys
from strategies.records import to_numpy, to_record

RESIDUAL_KEY = "codec-residual"
LEDGER_KEY = "dp-ledger"  # context.state: this client's (sigma, q, steps) releases, across rounds


def load_ledger(context: Context) -> list[tuple[float, float, int]]:
    """This client's privacy ledger (empty on its first round)."""
    if LEDGER_KEY not in context.state:
        return []
    rec = context.state[LEDGER_KEY]
    return [(float(a), float(b), int(c)) for a, b, c in zip(rec["sigma"], rec["q"], rec["steps"])]


def store_ledger(context: Context, ledger: list[tuple[float, float, int]]) -> None:
    context.state[LEDGER_KEY] = ConfigRecord(
        {"sigma": [float(h[0]) for h in ledger], "q": [float(h[1]) for h in ledger], "steps": [int(h[2]) for h in ledger]}
    )


def budget_refusal(
    ledger: list[tuple[float, float, int]], release: tuple[float, float, int], delta: float, max_epsilon: float
) -> str | None:
    """Why the next ``release`` must not happen (it would exceed ``max_epsilon``), or None (0 = no budget)."""
    planned = sample_epsilon(ledger + [release], delta)
    if max_epsilon <= 0 or planned <= max_epsilon:
        return None
    return (f"privacy budget spent: epsilon {sample_epsilon(ledger, delta):.3f}, one more release would reach "
            f"{planned:.3f} > max-epsilon {max_epsilon:g}")


def decline(msg: Message, reason: str) -> Message:
    """A reply that says why this client does not train this round (the server logs and reports it)."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error() or "config" not in msg.content:
        return call_next(msg, context)
    config = msg.content["config"]
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    if dp_keys.NOISE_STD_KEY not in config:
        return call_next(msg, context)
    clip, std = float(config[dp_keys.CLIP_KEY]), float(config[dp_keys.NOISE_STD_KEY])
    ledger_sigma = float(config.get(dp_keys.LEDGER_SIGMA_KEY, 0.0))
    delta = float(config.get(dp_keys.DELTA_KEY, 1e-5))
    ledger = load_ledger(context)
    if ledger_sigma > 0:  # local DP: this client's own guarantee, checked before any work
        refusal = budget_refusal(ledger, (ledger_sigma, 1.0, 1), delta,
                                 float(config.get(dp_keys.MAX_EPSILON_KEY, 0.0)))
        if refusal:
            return decline(msg, f"node {context.node_id}: {refusal}")
    global_arrays = to_numpy(msg.content["arrays"])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local = to_numpy(reply.content["arrays"])
    delta_arrays = OrderedDict((k, local[k] - global_arrays[k]) for k in local)
    norm = update_norm(delta_arrays)
    # fresh OS entropy, never the run seed: noise the server could regenerate would protect nothing
    private = privatize_update(delta_arrays, clip, std, np.random.default_rng())
    reply.content["arrays"] = to_record(OrderedDict((k, global_arrays[k] + private[k]) for k in local))
    metrics = reply.content["metrics"]
    metrics["update-norm"] = norm
    metrics["clipped"] = float(norm > clip)
    if ledger_sigma > 0:
        ledger = ledger + [(ledger_sigma, 1.0, 1)]
        store_ledger(context, ledger)
        metrics["dp-epsilon"] = sample_epsilon(ledger, delta)
    return reply


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.has_error() or "config" not in msg.content or "codec-down" not in msg.content["config"]:
        return call_next(msg, context)
    config = msg.content["config"]
    down = make_codec(str(config["codec-down"]))
    global_arrays = decode_self_describing(down, to_numpy(msg.content["arrays"]))
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


@functools.lru_cache(maxsize=4)
def _settings(run_config: tuple) -> Settings:
    return Settings.from_run_config(dict(run_config))


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or not context.run_config.get("inject-faults"):
        return call_next(msg, context)
    settings = _settings(tuple(sorted(context.run_config.items())))
    server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    kind = fault_of(settings.fault_fractions, int(context.node_config["partition-id"]),
                    int(context.node_config["num-partitions"]), settings.seed, server_round)
    if kind is None:
        return call_next(msg, context)
    if kind == "crash":
        raise RuntimeError(f"injected fault: crash (partition {context.node_config['partition-id']}, "
                           f"round {server_round})")
    if kind == "timeout":
        time.sleep(settings.round_timeout + 5.0)  # the server has stopped waiting for this reply
        return call_next(msg, context)
    reference = to_numpy(msg.content["arrays"])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    rng = np.random.default_rng([settings.seed, server_round, int(context.node_id) % 2**32])
    reply.content["arrays"] = to_record(corrupt_update(kind, to_numpy(reply.content["arrays"]), reference, rng))
    return reply
