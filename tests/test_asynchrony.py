"""Asynchronous buffered aggregation: staleness functions, the buffer, delay compensation, the loop.

The loop runs here against an in-process grid whose clients answer after a
set number of pulls (fast and slow nodes), so arrival order, staleness,
duplicates and late replies are exact and the tests take seconds; the
federation tests (simulation, resume, deployment) are in
tests/test_async_federation.py.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmm.asynchrony import (
    Arrival,
    UpdateBuffer,
    delay_compensated,
    parse_staleness,
)
from fedmm.compression import make_codec
from fedmm.config import ConfigError, Settings
from fedmm.protocol import to_numpy, to_record
from server.asynchronous import AsynchronousLoop
from server.chain import build_chain, build_strategy
from server.history import MetricsHistory
from conftest import honest_metrics

RANK = 4


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


# --- staleness functions -------------------------------------------------------------------------------------
def test_staleness_functions_are_fedasync_s():
    assert [parse_staleness("constant").weight(t) for t in (0, 5, 50)] == [1.0, 1.0, 1.0]
    poly = parse_staleness("polynomial a=0.5")
    assert poly.weight(0) == 1.0 and poly.weight(3) == pytest.approx(0.5) and poly.weight(8) == pytest.approx(1 / 3)
    hinge = parse_staleness("hinge a=2 b=1")
    assert [hinge.weight(t) for t in (0, 1)] == [1.0, 1.0]
    assert hinge.weight(3) == pytest.approx(1 / 5)  # 1 / (a (tau - b) + 1)
    for s in (poly, hinge, parse_staleness("polynomial a=2")):
        weights = [s.weight(t) for t in range(30)]
        assert all(0 < b <= a <= 1 for a, b in zip(weights, weights[1:]))
    assert parse_staleness("hinge").spec == "hinge a=10 b=4"  # the defaults


@pytest.mark.parametrize("text, message", [
    ("exponential", "unknown staleness function 'exponential'"),
    ("polynomial a=0", r"a must be a number in \(0, 10\]"),
    ("polynomial a=2000", r"a must be a number in \(0, 10\]"),  # audit: s underflowed to 0, the run divided by 0
    ("hinge a=1e308", r"a must be a number in \(0, 1e\+06\]"),
    ("polynomial b=1", "unknown parameter 'b=1'"),
    ("hinge a=1 b=-1", "b must be a finite number >= 0"),
    ("hinge a=x", "a = 'x' is not a number"),
    ("constant a=1", "its parameters: none"),
])
def test_bad_staleness_specs_are_refused_with_the_key(text, message):
    with pytest.raises(ValueError, match=message):
        parse_staleness(text)
    with pytest.raises(ConfigError, match=f"run-config 'staleness' = '{text}'"):
        Settings.from_run_config({"asynchronous": True, "staleness": text})


# --- the buffer, the step, delay compensation ----------------------------------------------------------------
def test_buffer_takes_k_updates_oldest_first_and_each_at_most_once():
    buffer: UpdateBuffer[str] = UpdateBuffer(3)
    for i, client in enumerate([1, 2, 1, 3]):
        assert buffer.add(Arrival(f"d{i}", client, 0, f"u{i}")) is None
        assert buffer.ready() == (i >= 2)
    assert [a.item for a in buffer.take()] == ["u0", "u1", "u2"]
    assert not buffer.ready() and [a.item for a in buffer.waiting] == ["u3"]
    assert "already accepted once" in buffer.add(Arrival("d1", 2, 0, "again"))  # applied before
    assert "already accepted once" in buffer.add(Arrival("d3", 3, 0, "again"))  # still waiting
    with pytest.raises(RuntimeError, match="fewer than 3"):
        buffer.take()


def test_buffer_under_dp_takes_one_update_per_client():
    buffer: UpdateBuffer[str] = UpdateBuffer(2, distinct_clients=True)
    buffer.add(Arrival("a", 1, 0, "1a"))
    buffer.add(Arrival("b", 1, 0, "1b"))
    assert not buffer.ready()  # two updates, one client: one release would hold two of its updates
    buffer.add(Arrival("c", 2, 0, "2c"))
    assert [a.item for a in buffer.take()] == ["1a", "2c"]
    assert [a.item for a in buffer.waiting] == ["1b"]  # waits for the next aggregation


def _fedbuff_step(deltas, weights, staleness) -> OrderedDict[str, np.ndarray]:
    """The step one aggregation should apply (eta_g = 1): sum_i w_i s_i delta_i / sum_i w_i s_i."""
    coefficients = np.asarray(weights, dtype=np.float64) * np.asarray(staleness, dtype=np.float64)
    return OrderedDict((k, sum(c * d[k] for c, d in zip(coefficients, deltas)) / coefficients.sum())
                       for k in deltas[0])


def test_dc_is_dc_asgd_s_correction_and_leaves_fresh_updates_alone():
    d1 = {"w": np.array([1.0, 2.0])}
    now, then = {"w": np.array([0.5, 1.0])}, {"w": np.array([0.0, 3.0])}
    dc = d1["w"] - 0.1 * d1["w"] ** 2 * (now["w"] - then["w"])  # DC-ASGD: [0.95, 2.8], longer than d1
    out = delay_compensated(d1, now, then, lam=0.1)
    # its direction, held to the update's norm (audit: a correction lengthened a bounded update past its bound)
    np.testing.assert_allclose(out["w"], dc * np.linalg.norm(d1["w"]) / np.linalg.norm(dc))
    shorter = delay_compensated(d1, then, now, lam=0.1)  # the other way the correction shortens: exact
    np.testing.assert_allclose(shorter["w"], d1["w"] - 0.1 * d1["w"] ** 2 * (then["w"] - now["w"]))
    np.testing.assert_array_equal(delay_compensated(d1, now, now, 0.1)["w"], d1["w"])  # fresh: unchanged
    np.testing.assert_array_equal(delay_compensated(d1, now, then, 0.0)["w"], d1["w"])


# --- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_config, message", [
    ({"fraction-train": 0.5}, "'fraction-train' = 0.5 with 'asynchronous'"),
    ({"secure-aggregation": True}, "'secure-aggregation' with 'asynchronous'"),
    ({"dp": "central-client", "delay-compensation": 0.1}, "'delay-compensation' with 'dp' = 'central-client'"),
    ({"buffer-size": 5, "concurrency": 3}, "'buffer-size' = 5 > 'concurrency' = 3"),
    ({"strategy": "fedmedian"}, "'asynchronous' with strategy 'FedMedian'"),
    ({"strategy": "krum", "strategy-args": "num_malicious_nodes=0"}, "'asynchronous' with strategy 'Krum'"),
    ({"strategy": "qfedavg", "local-optimizer": "sgd"}, "'asynchronous' with strategy 'QFedAvg'"),
    ({"strategy": "flora"}, "'asynchronous' with strategy 'FLoRA'"),
])
def test_what_the_loop_cannot_honour_is_refused_before_any_client(run_config, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(Settings.from_run_config({"asynchronous": True, **run_config}), MetricsHistory())


# --- the loop, against an in-process grid --------------------------------------------------------------------
def _global() -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict([("m.lora_A.weight", rng.normal(size=(RANK, 6)).astype(np.float32)),
                        ("m.lora_B.weight", rng.normal(size=(5, RANK)).astype(np.float32) * 0.1)])


def _delta(node: int, version: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng([node, version])
    return OrderedDict((k, (0.01 * rng.normal(size=v.shape)).astype(np.float32)) for k, v in _global().items())


def _train_reply(msg: Message, node: int, version: int, codec: str = "fp32") -> Message:
    payload = make_codec(codec).encode(_delta(node, version), np.random.default_rng([node, version]))
    # group 0 right 9 of 10, group 1 right 2 of 10 on every client: an accuracy gap of 0.7
    metrics = MetricRecord(honest_metrics(**{
        "num-examples": 10 + node, "partition-id": node - 1, "lora-rank": RANK, "train-loss": 1.0 / node,
        "cstat-correct-g0": 9.0, "cstat-count-g0": 10.0, "cstat-correct-g1": 2.0, "cstat-count-g1": 10.0}))
    return Message(RecordDict({"arrays": to_record(payload), "metrics": metrics}), reply_to=msg)


class _Federation:
    """A grid whose node n answers a train message after ``pulls[n]`` pulls (None: never)."""

    def __init__(self, pulls: dict[int, int | None], duplicate_of: int | None = None,
                 late_reply_of: int | None = None, codec: str = "fp32") -> None:
        self.pulls, self.tick, self.sent, self.count, self.codec = pulls, 0, [], 0, codec
        self.duplicate_of, self.late_reply_of = duplicate_of, late_reply_of  # nodes whose first reply repeats
        self.replied: dict[str, Message] = {}
        self.extra: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.pulls)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata._message_id = f"d{self.count}"
            version = int(msg.content["config"]["server-round"]) - 1
            self.sent.append((msg, self.tick, version))
            ids.append(msg.metadata.message_id)
        return ids

    def _answer(self, msg: Message, version: int) -> Message:
        reply = _train_reply(msg, msg.metadata.dst_node_id, version, self.codec)
        reply.metadata._message_id = f"r{msg.metadata.message_id}"
        return reply

    def pull_messages(self, ids):
        self.tick += 1
        time.sleep(0.005)  # a pull's wall time: round-timeout is the loop's wall-clock limit
        wanted, out = set(ids), []
        for msg, at, version in self.sent:
            pulls = self.pulls[msg.metadata.dst_node_id]
            mid = msg.metadata.message_id
            if pulls is not None and self.tick >= at + pulls and mid in wanted and mid not in self.replied:
                self.replied[mid] = reply = self._answer(msg, version)
                out.append(reply)
                if msg.metadata.dst_node_id == self.duplicate_of and len(self.replied) < 8:
                    self.extra.append(reply)  # the same reply again, a pull later
        if self.late_reply_of is not None and self.tick == 40:  # a reply to a dispatch given up long ago
            first = next(m for m, _, v in self.sent if m.metadata.dst_node_id == self.late_reply_of)
            out.append(self._answer(first, 0))
        out, self.extra = out + self.extra, []
        return out

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            replies.append(Message(RecordDict({"metrics": MetricRecord(honest_metrics(
                "evaluate", **{"num-examples": 5, "partition-id": node - 1, "zs-acc": 0.5}))}), reply_to=msg))
        return replies


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, np.ndarray]]] = []

    def __call__(self, server_round, arrays):
        self.calls.append((server_round, to_numpy(arrays)))


def _loop(grid: _Federation, rounds: int, **run_config) -> tuple[AsynchronousLoop, _Recorder, list]:
    settings = Settings.from_run_config({"asynchronous": True, "lora-rank": RANK, "num-server-rounds": rounds,
                                         **run_config})
    history = MetricsHistory()
    chain = build_chain(settings, build_strategy(settings, history), history, len(grid.pulls))
    applied = []
    expect = chain.staleness.expect
    chain.staleness.expect = lambda rid, tau, v, arr: (applied.append((rid, tau, v)), expect(rid, tau, v, arr))[1]
    recorder = _Recorder()
    loop = AsynchronousLoop(settings, chain, history, recorder, grid, ConfigRecord({}), ConfigRecord({}), rounds,
                            pull_interval=0.0)
    return loop, recorder, applied


def test_the_loop_applies_each_reply_once_and_drops_duplicates_and_late_replies():
    random.seed(0)
    grid = _Federation({1: 1, 2: 1, 3: 4, 4: None}, duplicate_of=1, late_reply_of=4)
    loop, recorder, applied = _loop(grid, rounds=20, **{"buffer-size": 2, "round-timeout": 0.08})
    loop.run(to_record(_global()))
    assert [r for r, _ in recorder.calls] == list(range(21))  # the base, then every aggregation
    assert len(applied) == 40 and len({rid for rid, _, _ in applied}) == 40  # 2 per aggregation, none twice
    reasons = [d["reason"] for d in loop.dropped]
    assert any("no dispatch in flight" in r for r in reasons), reasons
    assert len(reasons) >= 2  # the duplicates (7 of them: replies to dispatches already applied) and the late one
    # node 4 never answers: it is given up after round-timeout and dispatched again
    assert sum(loop.history.rounds[r].get("async/abandoned", 0) for r in loop.history.rounds) >= 1
    # staleness is the versions applied since the dispatch: the slow node's updates are the stale ones
    by_node = {}
    for rid, tau, version in applied:
        node = next(m.metadata.dst_node_id for m, _, _ in grid.sent if f"r{m.metadata.message_id}" == rid)
        by_node.setdefault(node, []).append(tau)
    assert max(by_node[3]) > max(by_node[1]) and 4 not in by_node


@pytest.mark.parametrize("codec", ["fp32", "q4-row"])
def test_one_aggregation_with_everyone_and_constant_staleness_is_a_fedavg_round(codec):
    """concurrency = buffer-size = clients, constant staleness: aggregation 1 equals a synchronous FedAvg round
    of the chain on the same replies (a lossy codec too: the same decoding, per reply)."""
    nodes = {1: 1, 2: 1, 3: 1, 4: 1}  # all four answer in the same pull: the buffer is their four updates
    random.seed(0)
    grid = _Federation(nodes, codec=codec)
    loop, recorder, _ = _loop(grid, rounds=1, **{"buffer-size": 4, "staleness": "constant", "codec": codec})
    loop.run(to_record(_global()))
    asynchronous = recorder.calls[1][1]

    settings = Settings.from_run_config({"lora-rank": RANK, "num-server-rounds": 1, "codec": codec})
    history = MetricsHistory()
    sync = build_chain(settings, build_strategy(settings, history), history, 4).outer
    messages = list(sync.configure_train(1, to_record(_global()), ConfigRecord({}), _Federation(nodes)))
    new, _ = sync.aggregate_train(1, [_train_reply(m, m.metadata.dst_node_id, 0, codec) for m in messages])
    for name, value in to_numpy(new).items():
        np.testing.assert_array_equal(asynchronous[name], value)
    assert not np.array_equal(asynchronous["m.lora_A.weight"], _global()["m.lora_A.weight"])


def test_stale_updates_are_weighted_by_s_tau_and_delay_compensated():
    """Two fast nodes, one slow: each aggregation's result is theta + sum w s delta' / sum w s, with delta' DC's."""
    random.seed(0)
    lam = 500.0  # large enough that the correction (~lam x 1e-6 here) is far above the tolerance
    loop, recorder, applied = _loop(_Federation({1: 1, 2: 1, 3: 5}), rounds=6,
                                    **{"buffer-size": 2, "staleness": "polynomial a=1", "delay-compensation": lam})
    versions = {}
    configure = loop._configure

    def spy(arrays):
        versions.setdefault(loop.version, to_numpy(arrays))
        return configure(arrays)

    loop._configure = spy
    loop.run(to_record(_global()))
    globals_ = dict(recorder.calls)
    nodes = {}
    for msg, _, version in loop.grid.sent:
        nodes[f"r{msg.metadata.message_id}"] = (msg.metadata.dst_node_id, version)
    assert any(tau > 0 for _, tau, _ in applied)
    for at in range(1, 7):
        batch = applied[2 * (at - 1): 2 * at]
        theta = versions[at - 1]
        deltas, weights, s = [], [], []
        for rid, tau, version in batch:
            node, sent_version = nodes[rid]
            assert sent_version == version and tau == at - 1 - version
            deltas.append(delay_compensated(_delta(node, version), theta, versions[version], lam) if tau else
                          _delta(node, version))
            weights.append(10 + node)
            s.append(1 / (tau + 1))
        step = _fedbuff_step(deltas, weights, s)
        for name in theta:
            np.testing.assert_allclose(globals_[at][name], theta[name] + step[name], rtol=1e-5, atol=1e-7)


def test_under_central_dp_each_aggregation_is_one_release_of_distinct_clients():
    """Client-level DP's sensitivity is one update of one client per release: a fast node's second update waits
    for the next aggregation, the staleness weight scales (never reweights) the clipped updates, and every
    aggregation is one release of the ledger."""
    random.seed(0)
    grid = _Federation({1: 1, 2: 1, 3: 6})
    loop, recorder, applied = _loop(grid, rounds=5, **{"buffer-size": 2, "dp": "central-server",
                                                        "dp-noise-multiplier": 0.5, "dp-clip-norm": 1.0})
    loop.run(to_record(_global()))
    nodes = {f"r{m.metadata.message_id}": m.metadata.dst_node_id for m, _, _ in grid.sent}
    for at in range(5):
        batch = [nodes[rid] for rid, _, _ in applied[2 * at: 2 * at + 2]]
        assert len(set(batch)) == 2, (at, batch)
    spent = loop.chain.ledger()
    assert spent.num_releases == 5 and spent.epsilon > 0 and len(recorder.calls) == 6
    assert loop.chain.staleness.uniform_mean


def test_the_constraints_take_one_dual_step_per_aggregation():
    """The multipliers are the chain's, stepped once per aggregation on the buffer's statistics, and sent with
    the next version's content."""
    random.seed(0)
    loop, recorder, _ = _loop(_Federation({1: 1, 2: 1, 3: 3}), rounds=4,
                              **{"buffer-size": 2, "constraints": "group-gap"})
    loop.run(to_record(_global()))
    history = loop.chain.constraints.history  # per aggregation: the multiplier it trained with, the gap measured
    trained_with = [history[r]["constraints/multiplier-group-gap"] for r in (1, 2, 3, 4)]
    assert all(history[r]["constraints/group-gap"] == pytest.approx(0.7) for r in (1, 2, 3, 4))
    assert 0 == trained_with[0] < trained_with[1] < trained_with[2] < trained_with[3]  # one step each
    assert loop.chain.constraints.multipliers["group-gap"] > trained_with[3]  # the fourth aggregation's step
    for msg, _, version in loop.grid.sent:  # a dispatch at version v carries the multiplier of after v steps
        assert float(msg.content["config"]["multiplier-group-gap"]) == pytest.approx(trained_with[version])


def test_under_a_uniform_mean_the_staleness_weight_scales_each_update_instead_of_reweighting():
    """Central DP's noise is calibrated to a uniform mean of K clipped updates (C / K each): s(tau) <= 1 must
    shrink an update, never raise another's share of the mean, as reweighting by s would."""
    from flwr.serverapp.strategy import FedAvg

    from strategies.staleness import StalenessWeighting

    theta = _global()
    wrapper = StalenessWeighting(FedAvg(weighted_by_key="unit-weight"), parse_staleness("polynomial a=1"),
                                 uniform_mean=True)
    list(wrapper.configure_train(1, to_record(theta), ConfigRecord({}), _Federation({1: 1, 2: 1})))
    replies, deltas = [], [_delta(1, 0), _delta(2, 0)]
    for i, (node, tau) in enumerate([(1, 0), (2, 3)]):
        local = OrderedDict((k, theta[k] + deltas[i][k]) for k in theta)
        msg = Message(RecordDict({"arrays": to_record(local), "metrics": MetricRecord(
            {"num-examples": 10 * node, "unit-weight": 1})}), dst_node_id=node, message_type="train")
        msg.metadata._message_id = f"r{node}"
        wrapper.expect(f"r{node}", tau, 0, theta)
        replies.append(msg)
    new, _ = wrapper.aggregate_train(1, replies)
    got = to_numpy(new)
    for k in theta:  # s = 1 and 1/4: the uniform mean of the scaled updates
        np.testing.assert_allclose(got[k], theta[k] + (deltas[0][k] + 0.25 * deltas[1][k]) / 2, rtol=1e-5, atol=1e-7)
    reweighted = _fedbuff_step(deltas, [1, 1], [1.0, 0.25])
    assert not np.allclose(got["m.lora_A.weight"], theta["m.lora_A.weight"] + reweighted["m.lora_A.weight"])
