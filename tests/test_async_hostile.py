"""The asynchronous loop (FedBuff) under hostile and broken clients: a fuzz through ``AsynchronousLoop``.

Four honest nodes answer every dispatch within a pull or two; three hostile ones answer each with a reply
drawn from the audit's kinds — declines, NaN payloads, finite updates of 1e20 entries (stale ones meet
delay compensation), an extra or a missing metric key, unreadable arrays, a reply claiming another node,
duplicates and late replies. With and without central DP and delay compensation, at buffer sizes 2 and 3:
no exception escapes, no global is ever non-finite, and every aggregation is released — under central DP,
one accounted release per aggregation (no reply can veto one). Then the audit's single defects: a run
whose buffer cannot fill stops with the reason, and under DP a fast client's updates do not pile up.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from test_asynchrony import RANK, _Federation, _global, _loop, _train_reply

import strategies
from fedmm.protocol import to_numpy, to_record

HONEST = (1, 2, 3, 4)
HOSTILE = (5, 6, 7)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


KINDS = ("decline", "nan", "huge", "extra-key", "missing-key", "unreadable", "other-node", "duplicate")


class _HostileFederation(_Federation):
    """Honest nodes answer after one or two pulls; hostile ones every pull, with a crafted reply."""

    def __init__(self, seed: int) -> None:
        super().__init__({**{n: 1 + (n % 2) for n in HONEST}, **{n: 1 for n in HOSTILE}})
        self.rng = random.Random(seed)
        self.kinds: list[str] = []

    def _answer(self, msg: Message, version: int) -> Message:
        reply = super()._answer(msg, version)
        if msg.metadata.dst_node_id not in HOSTILE:
            return reply
        kind = self.rng.choice(KINDS)
        self.kinds.append(kind)
        if kind == "decline":
            out = Message(Error(code=0, reason="declined"), reply_to=msg)
        elif kind in ("nan", "huge"):
            delta = OrderedDict((k, np.full(v.shape, np.nan if kind == "nan" else 1e20, np.float32))
                                for k, v in _global().items())
            flat = np.concatenate([v.ravel() for v in delta.values()])
            reply.content["arrays"] = to_record({"values": flat})
            out = reply
        elif kind == "extra-key":
            reply.content["metrics"]["surprise"] = 1.0
            out = reply
        elif kind == "missing-key":
            del reply.content["metrics"]["train-seconds"]
            out = reply
        elif kind == "unreadable":
            reply.content["arrays"] = ArrayRecord({"values": Array(dtype="float32", shape=(7,), stype="numpy.ndarray",
                                                                   data=b"xyz")})
            out = reply
        elif kind == "other-node":
            reply.metadata.__dict__["_src_node_id"] = HONEST[0]
            out = reply
        else:
            self.extra.append(reply)  # the same reply twice
            out = reply
        out.metadata._message_id = f"r{msg.metadata.message_id}"
        return out


CONFIGS = [
    {},
    {"delay-compensation": 0.5},
    {"dp": "central-server", "dp-noise-multiplier": 0.1},
    {"dp": "central-server", "dp-noise-multiplier": 0.1, "delay-compensation": 0.5},
    {"dp": "central-client", "dp-noise-multiplier": 0.1},
]


@pytest.mark.parametrize("buffer_size", [2, 3])
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "dc", "central-server", "central-server-dc", "central-client"])
def test_hostile_replies_never_crash_the_loop_nor_veto_a_release(config, buffer_size):
    random.seed(0)
    grid = _HostileFederation(seed=buffer_size)
    rounds = 8
    loop, recorder, applied = _loop(grid, rounds=rounds, **{"buffer-size": buffer_size, "round-timeout": 5.0,
                                                            "min-nodes": 2, **config})
    final = loop.run(to_record(_global()))  # nothing may escape
    assert loop.stopped is None and loop.version == rounds
    assert set(grid.kinds) >= {"decline", "nan", "huge"}, grid.kinds
    for rnd, arrays in recorder.calls:
        assert all(np.all(np.isfinite(v)) for v in arrays.values()), f"aggregation {rnd}: a non-finite global"
    assert all(np.all(np.isfinite(v)) for v in to_numpy(final).values())
    # every aggregation took buffer-size valid updates and released a model (the global moved each time)
    assert len(applied) == rounds * buffer_size
    for (_, before), (_, after) in zip(recorder.calls, recorder.calls[1:]):
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    if "dp" in config:  # one accounted release per aggregation: no decline, NaN or norm vetoed one
        ledger = next(s for s in strategies.wrapper_chain(loop.chain.stateful) if hasattr(s, "privacy_spent"))
        assert ledger.privacy_spent().num_releases == rounds
    # each hostile reply is accounted for: counted as a failure, or dropped with its reason
    reasons = [d["reason"] for d in loop.dropped] + [str(d["reason"]) for d in loop.chain.reply_check.drops]
    assert any("non-finite" in r or "NaN" in r for r in reasons), reasons
    assert any("a reply from node" in r for r in reasons) or "other-node" not in grid.kinds
    assert loop.chain.book.failures or "decline" not in grid.kinds


def test_a_buffer_that_cannot_fill_stops_the_run_with_the_reason():
    """Audit item 9: with buffer-size equal to the node count under DP (one update per client per
    aggregation) and one silent node, the run never aggregated and never ended."""
    random.seed(0)
    grid = _Federation({1: 1, 2: 1, 3: 1, 4: None})
    loop, recorder, _ = _loop(grid, rounds=3, **{"buffer-size": 4, "round-timeout": 0.2, "dp": "central-server",
                                                 "dp-noise-multiplier": 0.1})
    loop.run(to_record(_global()))
    assert loop.version == 0 and loop.stopped is not None
    assert "needs 4 from distinct clients" in loop.stopped and "3 updates from 3 clients" in loop.stopped


def test_under_dp_a_fast_clients_updates_do_not_pile_up():
    """Audit item 9: a fast client was dispatched again at once while its update waited for a slower
    aggregation: 600 updates (and 75 pinned versions) after 120 aggregations. It now waits with its update."""
    random.seed(0)
    grid = _Federation({1: 1, 2: 1, 3: 6, 4: 6})
    loop, _, _ = _loop(grid, rounds=6, **{"buffer-size": 4, "round-timeout": 5.0, "dp": "central-server",
                                          "dp-noise-multiplier": 0.1})
    loop.run(to_record(_global()))
    assert loop.version == 6
    sent_to_fast = sum(1 for m, _, _ in grid.sent if m.metadata.dst_node_id == 1)
    assert sent_to_fast <= 6 + 1  # one dispatch per aggregation (and the one in flight at the end)
    assert max(loop.history.rounds[r].get("async/waiting", 0) for r in range(1, 7)) <= 4


def test_distinct_clients_is_offered_without_dp():
    """Audit item 9: one fast client supplied 67% of the applied updates; with distinct-clients every
    aggregation holds buffer-size different clients."""
    random.seed(0)
    grid = _Federation({1: 1, 2: 5, 3: 5, 4: 5})
    loop, _, applied = _loop(grid, rounds=5, **{"buffer-size": 3, "round-timeout": 5.0, "distinct-clients": True})
    loop.run(to_record(_global()))
    nodes = {f"r{m.metadata.message_id}": m.metadata.dst_node_id for m, _, _ in grid.sent}
    batches = [applied[i:i + 3] for i in range(0, len(applied), 3)]
    assert len(batches) == 5 and all(len({nodes[rid] for rid, _, _ in b}) == 3 for b in batches)


def test_a_node_whose_replies_are_refused_waits_for_the_next_version():
    """Audit item 9 (small): a node whose reply was malformed was dispatched again at every pull (80 pushes
    and warnings in 5 aggregations). It now waits for the next global version, as a declining node does."""

    class Broken(_Federation):
        def _answer(self, msg, version):
            reply = super()._answer(msg, version)
            if msg.metadata.dst_node_id == 4:
                reply.content["arrays"] = ArrayRecord({"values": Array(dtype="float32", shape=(7,),
                                                                       stype="numpy.ndarray", data=b"xyz")})
            return reply

    random.seed(0)
    grid = Broken({1: 3, 2: 3, 3: 3, 4: 1})
    loop, _, _ = _loop(grid, rounds=5, **{"buffer-size": 3, "round-timeout": 5.0})
    loop.run(to_record(_global()))
    assert loop.version == 5
    to_broken = [v for m, _, v in grid.sent if m.metadata.dst_node_id == 4]
    assert len(to_broken) == len(set(to_broken)) <= 6  # at most one dispatch per global version
