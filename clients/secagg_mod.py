"""``secagg_mod`` and ``answer_stage`` (pair with ``strategies.secure_aggregation.SecureAggregation``).

With ``secagg`` in the train config, ``secagg_mod`` (outside compression, so it sees the fp32 codec's
flat payload of the update) keeps the update and this round's SecAgg+ secrets in ``context.state`` and
replies with two public keys instead of the update. ``answer_stage`` (the ClientApp's ``query.secagg``
handler) answers the stages that follow: share, mask (clip to C, scale by the weight the server names,
integer-encode with a Skellam share drawn from OS entropy, mask) and unmask (fedmm.secagg.SecAggClient
enforces the double-masking rule). The update and the secrets never leave the site unmasked; the
state is cleared once the round's unmask answer is sent. Under ``dp = distributed`` a client refuses a code
whose noise share is below what the train config promised (multiplier / sqrt(shares)).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from clients.messages import decline
from clients.settings import run_settings
from fedmm import protocol
from fedmm.protocol import to_numpy, to_record
from fedmm.secagg import IntegerCode, SecAggClient, encode_integer
from fedmm.secagg.integer import padded_length, ring_dtype
from fedmm.secagg.masking import ids_bytes, ids_of

UPDATE_KEY = "secagg-update"  # context.state: this round's flat update, until the mask stage
CLIENT_KEY = "secagg-client"  # context.state: this round's SecAgg+ secrets and received shares
_PROMISE = ("promised-noise-multiplier", "promised-shares")  # the train config's DP noise, for the mask stage


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if (msg.metadata.message_type != MessageType.TRAIN or msg.has_error() or protocol.CONFIG not in msg.content
            or protocol.config_in(msg.content).get(protocol.SECAGG) is not True):
        return call_next(msg, context)
    config = protocol.config_in(msg.content)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    payload = to_numpy(protocol.arrays_in(reply.content))
    if list(payload) != [protocol.PAYLOAD_VALUES] or payload[protocol.PAYLOAD_VALUES].dtype != np.float32:
        return decline(msg, f"node {context.node_id}: secure aggregation needs the fp32 codec's payload, got "
                            f"{sorted(payload)}")
    client = SecAggClient(context.node_id)
    c_key, s_key = client.public_keys()
    distributed = config.get(protocol.DP_MODE) == "distributed"
    promise = (protocol.number(config, protocol.DP_NOISE_MULTIPLIER), protocol.number(config, protocol.DP_NOISE_SHARES)) \
        if distributed else (0.0, 1.0)
    context.state[UPDATE_KEY] = to_record({protocol.PAYLOAD_VALUES: payload[protocol.PAYLOAD_VALUES]})
    context.state[CLIENT_KEY] = ConfigRecord({**client.state(), protocol.SA_ROUND: protocol.integer(config, protocol.SERVER_ROUND),
                                              **dict(zip(_PROMISE, promise))})
    del reply.content[protocol.ARRAYS]
    reply.content[protocol.SECAGG] = ConfigRecord({protocol.SA_C_KEY: c_key, protocol.SA_S_KEY: s_key})
    # what this client will send: its masked vector in the run's ring (plus the keys above)
    settings = run_settings(context)
    metrics = protocol.metrics_in(reply.content)
    itemsize = np.dtype(ring_dtype(settings.secagg_bits)).itemsize
    metrics[protocol.BYTES_UPLINK] = padded_length(payload[protocol.PAYLOAD_VALUES].size) * itemsize
    if settings.dp == "none":  # under any DP mode whether clipping bound is withheld (fedmm/privacy/release.py)
        metrics[protocol.CLIPPED] = float(np.linalg.norm(payload[protocol.PAYLOAD_VALUES]) > settings.secagg_clip_norm)
    return reply


def answer_stage(msg: Message, context: Context) -> Message:
    """The ClientApp's ``query.secagg`` handler: one stage of this round's secure aggregation."""
    who = f"node {context.node_id}: secure aggregation"
    record = msg.content[protocol.SECAGG] if protocol.SECAGG in msg.content else None
    if not isinstance(record, ConfigRecord) or CLIENT_KEY not in context.state:
        return decline(msg, f"{who}: a stage request without a round in progress")
    state = protocol.config_in(context.state, CLIENT_KEY)
    stage = record.get(protocol.SA_STAGE)
    if record.get(protocol.SA_ROUND) != state[protocol.SA_ROUND]:
        return decline(msg, f"{who}: a {stage!r} request for round {record.get(protocol.SA_ROUND)!r}, this "
                            f"client trained in round {state[protocol.SA_ROUND]!r}")
    client = SecAggClient.from_state(state)
    try:
        if stage == "share":
            content = _share(client, record)
        elif stage == "mask":
            content = _mask(client, record, context, (protocol.number(state, _PROMISE[0]),
                                                      protocol.number(state, _PROMISE[1])))
        elif stage == "unmask":
            content = _unmask(client, record)
        else:
            raise ValueError(f"unknown stage {stage!r}")
    except (KeyError, TypeError, ValueError) as exc:
        return decline(msg, f"{who}, {stage!r}: {type(exc).__name__}: {exc}")
    if stage == "unmask":  # the round is over for this client: nothing of it stays behind
        del context.state[CLIENT_KEY]
    else:
        context.state[CLIENT_KEY] = ConfigRecord({**dict(state), **client.state()})
    return Message(content, reply_to=msg)


def _share(client: SecAggClient, record: ConfigRecord) -> RecordDict:
    ids = ids_of(protocol.blob(record, protocol.SA_IDS))
    c_keys, s_keys = protocol.blobs(record, protocol.SA_C_KEYS), protocol.blobs(record, protocol.SA_S_KEYS)
    if not len(ids) == len(c_keys) == len(s_keys):
        raise ValueError("the neighbourhood's ids and keys differ in number")
    keys = {i: (c, s) for i, c, s in zip(ids, c_keys, s_keys)}
    ciphertexts, commitment = client.share(keys, protocol.integer(record, protocol.SA_THRESHOLD),
                                           protocol.integer(record, protocol.SA_BITS),
                                           protocol.integer(record, protocol.SA_LENGTH))
    holders = sorted(ciphertexts)
    return RecordDict({protocol.SECAGG: ConfigRecord({
        protocol.SA_TO: ids_bytes(holders), protocol.SA_CIPHERTEXTS: [ciphertexts[h] for h in holders],
        protocol.SA_COMMITMENT: commitment})})


def _mask(client: SecAggClient, record: ConfigRecord, context: Context, promise: tuple[float, float]) -> RecordDict:
    code = IntegerCode.from_dict({k[len(protocol.SA_CODE):]: v for k, v in record.items()
                                  if k.startswith(protocol.SA_CODE)})
    update = to_numpy(protocol.arrays_in(context.state, UPDATE_KEY))[protocol.PAYLOAD_VALUES].astype(np.float64)
    if (code.dim, code.length, code.bits) != (update.size, client.length, client.bits):
        raise ValueError(f"the code's dim {code.dim}, length {code.length}, bits {code.bits} do not fit this "
                         f"round's update ({update.size} values) and ring ({client.length}, {client.bits} bits)")
    sigma, shares = promise
    needed = (sigma * code.l2_sensitivity()) ** 2 / shares
    if code.noise_variance < needed * (1 - 1e-9):
        raise ValueError(f"the code's noise share {code.noise_variance:.6g} is below the {needed:.6g} the train "
                         f"config promised (noise multiplier {sigma:g}, {shares:g} shares)")
    weight = record[protocol.SA_WEIGHT]
    if isinstance(weight, bool) or not isinstance(weight, float) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight {weight!r} must be a number in [0, 1]")
    norm = float(np.linalg.norm(update))
    clipped = update * min(1.0, code.clip / norm) if norm > 0 else update
    sources = ids_of(protocol.blob(record, protocol.SA_FROM))
    ciphertexts = protocol.blobs(record, protocol.SA_CIPHERTEXTS)
    if len(sources) != len(ciphertexts):
        raise ValueError("sources and ciphertexts differ in number")
    # fresh OS entropy, never a seed: rounding and noise the server could replay would protect nothing
    vector = encode_integer(weight * clipped, code, np.random.default_rng())
    masked = client.mask(dict(zip(sources, ciphertexts)), vector)
    del context.state[UPDATE_KEY]
    return RecordDict({protocol.ARRAYS: ArrayRecord({protocol.SA_MASKED: Array(np.ascontiguousarray(masked))})})


def _unmask(client: SecAggClient, record: ConfigRecord) -> RecordDict:
    shares = client.unmask(ids_of(protocol.blob(record, protocol.SA_CONTRIBUTORS)),
                           ids_of(protocol.blob(record, protocol.SA_DROPPED)))
    owners = sorted(shares)
    return RecordDict({protocol.SECAGG: ConfigRecord({protocol.SA_OWNERS: ids_bytes(owners),
                                                      protocol.SA_SHARES: [shares[o] for o in owners]})})
