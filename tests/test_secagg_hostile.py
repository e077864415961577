"""Secure aggregation under hostile clients: a fuzz of every stage's replies, through the real chain and mods.

Three of ten clients answer one stage of a round with a crafted reply — malformed and wrong-curve public keys,
a key copied from a neighbour, shares addressed to non-neighbours or to themselves, repeated node ids, masked
vectors of the wrong length, dtype or out-of-ring values, replies shaped for another stage — while seven
honest clients (at least the threshold t = 6) follow the protocol. No exception may escape, each hostile
sender is dropped with its stage and reason (and no honest one), and the released mean is exactly the
contributors' (the honest ones, plus a hostile one whose masked vector came before its bad reply). Then the
audit's single defects: an in-ring offset (the decoded mean's bound), a commitment that does not verify
(attributed, and not twice), contributors cut into groups (nothing unmasked).
"""

from __future__ import annotations

import random
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from test_secagg_rounds import IDS, _check_mean, _expected, _Federation, _global, _settings

from fedmm import protocol
from fedmm.protocol import to_numpy, to_record
from fedmm.secagg import SecAggAbort, SecAggClient, SecAggServer
from fedmm.secagg.masking import ids_bytes
from server.chain import find_wrapper, make_strategy
from server.history import MetricsHistory
from strategies.secure_aggregation import SecureAggregation

HOSTILE = IDS[7:]
BITS = 20  # masked vectors travel as uint32: values past 2^20 are outside the ring
TRIALS = 12


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _bad_keys(rng: random.Random, own: tuple[bytes, bytes], other: tuple[bytes, bytes]) -> list:
    """One crafted pair of public keys (what a train reply under secure aggregation carries)."""
    which = rng.randrange(2)
    bad = [lambda: rng.randbytes(rng.randrange(1, 400)),
           lambda: _pem(ec.generate_private_key(ec.SECP256R1())),
           lambda: _pem(ed25519.Ed25519PrivateKey.generate()),
           lambda: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
           lambda: other[which],  # a neighbour's key: repeated
           lambda: own[1 - which]][rng.randrange(6)]()  # both the same
    pair = list(own)
    pair[which] = bad
    return pair


def _bad_stage_reply(rng: random.Random, stage: str, request: Message, reply: Message) -> tuple[Message, str]:
    """A crafted reply to ``stage``, and the kind (for the failure message)."""
    if reply.has_error():
        return reply, "error"
    if stage == "share":
        record = reply.content[protocol.SECAGG]
        holders = np.frombuffer(record[protocol.SA_TO], dtype=np.uint64)[1:].tolist()
        ciphertexts = list(record[protocol.SA_CIPHERTEXTS])
        kind = rng.choice(["to-itself", "to-stranger", "repeated-holder", "short-commitment", "unmask-shaped"])
        if kind == "to-itself":
            holders[0] = request.metadata.dst_node_id
        elif kind == "to-stranger":
            holders[0] = 2**63 + 1
        elif kind == "repeated-holder":
            holders[1] = holders[0]
        elif kind == "short-commitment":
            record[protocol.SA_COMMITMENT] = b"\x00" * 31
        if kind == "unmask-shaped":
            content = ConfigRecord({protocol.SA_OWNERS: ids_bytes([1]), protocol.SA_SHARES: [b"y"]})
            return Message(RecordDict({protocol.SECAGG: content}), reply_to=request), kind
        record[protocol.SA_TO], record[protocol.SA_CIPHERTEXTS] = ids_bytes(holders), ciphertexts
        return reply, kind
    if stage == "mask":
        masked = to_numpy(reply.content[protocol.ARRAYS])[protocol.SA_MASKED]
        kind = rng.choice(["short", "long", "float", "uint16", "out-of-ring", "share-shaped"])
        if kind == "share-shaped":
            content = ConfigRecord({protocol.SA_TO: ids_bytes([1]), protocol.SA_CIPHERTEXTS: [b"x"],
                                    protocol.SA_COMMITMENT: bytes(32)})
            return Message(RecordDict({protocol.SECAGG: content}), reply_to=request), kind
        bad = {"short": masked[:-1], "long": np.concatenate([masked, masked[:1]]),
               "float": masked.astype(np.float32), "uint16": masked.astype(np.uint16),
               "out-of-ring": masked | np.uint32(1 << BITS)}[kind]
        return Message(RecordDict({protocol.ARRAYS: ArrayRecord({protocol.SA_MASKED: Array(bad)})}),
                       reply_to=request), kind
    record = reply.content[protocol.SECAGG]
    kind = rng.choice(["short-share", "stranger-owner", "repeated-owner", "mask-shaped"])
    if kind == "mask-shaped":
        return Message(RecordDict({protocol.ARRAYS: ArrayRecord({protocol.SA_MASKED: Array(
            np.zeros(4, np.uint32))})}), reply_to=request), kind
    owners = np.frombuffer(record[protocol.SA_OWNERS], dtype=np.uint64)[1:].tolist()
    shares = list(record[protocol.SA_SHARES])
    if kind == "short-share":
        shares[0] = shares[0][:-1]
    elif kind == "stranger-owner":
        owners[0] = 2**63 + 1
    else:
        owners[1] = owners[0]
    record[protocol.SA_OWNERS], record[protocol.SA_SHARES] = ids_bytes(owners), shares
    return reply, kind


def _trained(tamper=None):
    """Round 1 of the chain up to the train replies (each holding its client's two public keys)."""
    settings = _settings(**{"secagg-bits": BITS})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=len(IDS))
    fed = _Federation(settings, tamper=tamper)
    messages = list(chain.configure_train(1, to_record(_global()), ConfigRecord({}), fed))
    return settings, chain, fed, messages, fed.train(messages)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_hostile_stage_replies_drop_only_their_senders_and_the_mean_stays_exact(trial):
    rng = random.Random(trial)
    stages = {nid: rng.choice(["keys", "share", "mask", "unmask"]) for nid in HOSTILE}
    kinds: dict[int, str] = {}

    def tamper(stage, node, request, reply):
        if stages.get(node) != stage:
            return reply
        reply, kinds[node] = _bad_stage_reply(rng, stage, request, reply)
        return reply

    settings, chain, fed, messages, replies = _trained(tamper)
    own = {r.metadata.src_node_id: (r.content[protocol.SECAGG][protocol.SA_C_KEY],
                                    r.content[protocol.SECAGG][protocol.SA_S_KEY]) for r in replies}
    for reply in replies:
        node = reply.metadata.src_node_id
        if stages.get(node) == "keys":
            other = own[IDS[0]]
            reply.content[protocol.SECAGG][protocol.SA_C_KEY], reply.content[protocol.SECAGG][protocol.SA_S_KEY] = \
                _bad_keys(rng, own[node], other)
            kinds[node] = "keys"
    arrays, _ = chain.aggregate_train(1, replies)  # nothing may escape
    secagg = find_wrapper(chain, SecureAggregation)
    dropped = {d["node"]: d["reason"] for d in secagg.drops}
    assert set(dropped) == set(HOSTILE), f"stages {stages}, kinds {kinds}: dropped {dropped}"
    for node, stage in stages.items():
        assert f"secure aggregation, {stage}: " in dropped[node], (kinds[node], dropped[node])
    contributors = [m.metadata.dst_node_id for m in messages
                    if m.metadata.dst_node_id not in HOSTILE or stages[m.metadata.dst_node_id] == "unmask"]
    assert arrays is not None and secagg.stats[1]["secagg/mean-clipped"] == 0.0
    _check_mean(arrays, _expected(fed, contributors, settings.secagg_clip_norm, weighted=True), chain)


def test_a_wrong_curve_key_drops_its_sender_not_its_neighbours():
    """Audit item 4: a P-256 encryption key passed the old check (distinct bytes under 4 KiB), every honest
    neighbour's key agreement failed at the share stage, all were dropped and the round released nothing."""
    settings, chain, fed, messages, replies = _trained()
    liar = replies[0].metadata.src_node_id
    replies[0].content[protocol.SECAGG][protocol.SA_C_KEY] = _pem(ec.generate_private_key(ec.SECP256R1()))
    arrays, _ = chain.aggregate_train(1, replies)
    secagg = find_wrapper(chain, SecureAggregation)
    assert [(d["node"], d["reason"]) for d in secagg.drops] == [
        (liar, "secure aggregation, keys: encryption key: a key on secp256r1, the protocol's curve is secp384r1")]
    honest = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id != liar]
    _check_mean(arrays, _expected(fed, honest, settings.secagg_clip_norm, weighted=True), chain)


def test_an_in_ring_offset_cannot_push_the_mean_past_what_clipped_updates_allow():
    """Audit item 5: one client adding a large in-ring offset to its masked vector moved the released mean to
    norm 3.3 with C = 1; nothing checked it. The decoded mean is now held to the honest bound."""
    clip = 1.0

    def offset(stage, node, request, reply):
        if stage != "mask" or node != IDS[3] or reply.has_error():
            return reply
        masked = to_numpy(reply.content[protocol.ARRAYS])[protocol.SA_MASKED]
        pushed = (masked.astype(np.uint64) + np.uint64(1 << (BITS - 3))) & np.uint64((1 << BITS) - 1)
        return Message(RecordDict({protocol.ARRAYS: ArrayRecord({protocol.SA_MASKED: Array(
            pushed.astype(masked.dtype))})}), reply_to=request)

    settings = _settings(**{"secagg-bits": BITS, "secagg-clip-norm": clip})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=len(IDS))
    fed = _Federation(settings, norm=0.5, tamper=offset)
    arrays, _ = chain.aggregate_train(1, fed.train(list(chain.configure_train(
        1, to_record(_global()), ConfigRecord({}), fed))))
    secagg = find_wrapper(chain, SecureAggregation)
    mean = np.concatenate([(to_numpy(arrays)[k] - v).ravel() for k, v in _global().items()])
    code = secagg.plan.code(mean.size, 0)
    assert secagg.stats[1]["secagg/mean-clipped"] == 1.0
    assert np.linalg.norm(mean) <= clip * 1.05 + 2 * len(IDS) * np.sqrt(code.length) / code.scale


def test_a_commitment_that_does_not_verify_aborts_once_naming_its_sender():
    """Audit item 6: a wrong 32-byte commitment ended the round with nobody dropped, and could do so every
    round. The abort names the node whose secret did not rebuild to its commitment, and that node takes no
    further part: the next round completes without it."""
    def forge(stage, node, request, reply):
        if stage == "share" and node == IDS[2] and not reply.has_error():
            reply.content[protocol.SECAGG][protocol.SA_COMMITMENT] = secrets.token_bytes(32)
        return reply

    settings = _settings(**{"secagg-bits": BITS})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=len(IDS))
    fed = _Federation(settings, tamper=forge)
    arrays = to_record(_global())
    first, _ = chain.aggregate_train(1, fed.train(list(chain.configure_train(1, arrays, ConfigRecord({}), fed))))
    secagg = find_wrapper(chain, SecureAggregation)
    assert first is None and secagg.stats[1]["secagg/aborted"] == 1.0
    assert [d["node"] for d in secagg.drops] == [IDS[2]] and "committed to" in secagg.drops[0]["reason"]
    messages = list(chain.configure_train(2, arrays, ConfigRecord({}), fed))
    assert IDS[2] not in {m.metadata.dst_node_id for m in messages} and len(messages) == len(IDS) - 1
    second, _ = chain.aggregate_train(2, fed.train(messages))
    assert second is not None and secagg.stats[2]["secagg/aborted"] == 0.0


def test_contributors_cut_into_groups_abort_before_anything_is_unmasked():
    """Audit item 7: with the sparse graph (50 clients, neighbourhoods of 13), two runs of dropped neighbours
    split the survivors into two groups whose masks cancel on their own; unmasking would let the server sum
    one group (13 of 38 clients in the audit's trial). The server aborts at the mask stage instead."""
    n, size, t = 50, 13, 7
    ids = [2**63 + 104729 * k for k in range(n)]
    clients = {nid: SecAggClient(nid) for nid in ids}
    server = SecAggServer(ids, t, 16, 8, size, rng=random.Random(3))
    asks = server.collect_keys({nid: c.public_keys() for nid, c in clients.items()})
    inbox = server.collect_shares({nid: clients[nid].share(keys, t, 16, 8) for nid, keys in asks.items()})
    positions = sorted(ids)  # the random ring the graph was drawn on (neighbourhoods' first draw of the rng)
    random.Random(3).shuffle(positions)
    gone = set(positions[0:6]) | set(positions[19:25])  # two runs of 6: 13 and 25 survivors between them
    vectors = {nid: clients[nid].mask(inbox[nid], np.zeros(8, np.uint16)) for nid in ids if nid not in gone}
    with pytest.raises(SecAggAbort, match=r"fell apart into 2 groups .*sizes \[25, 13\]"):
        server.collect_masked(vectors)
    assert all(not c._unmasked for c in clients.values())

