"""Secure aggregation through the real chain and the real client mods, in one process.

The server's chain (``make_strategy``) runs its rounds against ``_Federation``: a Grid whose clients are
the ClientApp's own mods (``secagg_mod`` around compression, faults and privacy, as clients/app.py
stacks them) and its ``query.secagg`` handler, each with its own ``Context`` whose state carries the
secrets between messages, as Flower's engines do. Only training is replaced by its contract (the
received global plus a known update), so the mean the server ends with can be checked against the one
computed here from those updates. Node ids are Flower-sized (all 64 bits).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

import clients.secagg_mod as secagg_mod_module
from clients.compression_mod import compression_mod
from clients.faults_mod import fault_injection_mod
from clients.privacy_mod import privacy_mod
from clients.secagg_mod import answer_stage, secagg_mod
from fedmm import protocol
from fedmm.config import DP_MODES, ConfigError, Settings
from fedmm.faults import fault_of
from fedmm.privacy import update_norm
from fedmm.privacy.accounting import gaussian_epsilon
from fedmm.protocol import to_numpy, to_record
from server.chain import find_wrapper, make_strategy
from server.history import MetricsHistory
from strategies.privacy import DistributedSkellam
from strategies.secure_aggregation import SecureAggregation
from conftest import honest_metrics

IDS = [2**63 + 7919 * k for k in range(10)]  # Flower's node ids use all 64 bits


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _settings(**kw) -> Settings:
    return Settings.from_run_config({"secure-aggregation": True, "lora-rank": 2, "min-nodes": 2,
                                     "fraction-train": 1.0, **kw})


def _global(rows: int = 30) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict([("m.lora_A.weight", rng.normal(size=(2, rows)).astype(np.float32)),
                        ("m.lora_B.weight", rng.normal(size=(20, 2)).astype(np.float32))])


def _update(node: int, rnd: int, like: OrderedDict, norm: float) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng([node % 2**32, rnd])
    raw = OrderedDict((k, rng.normal(size=v.shape)) for k, v in like.items())
    scale = norm / update_norm(raw) if norm else 0.0
    return OrderedDict((k, (scale * v).astype(np.float32)) for k, v in raw.items())


class _Federation:
    """The server's Grid, and the clients' mod stacks behind it. ``rewrite(stage, node, record)`` may alter a
    stage request before the client reads it, ``tamper(stage, node, request, reply) -> reply`` its reply."""

    def __init__(self, settings: Settings, norm: float = 0.5, tamper=None, rewrite=None) -> None:
        run_config = settings.to_run_config()
        self.contexts = {nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=run_config,
                                      node_config={"partition-id": i, "num-partitions": len(IDS)})
                         for i, nid in enumerate(IDS)}
        self.norm, self.tamper, self.rewrite = norm, tamper, rewrite
        self.updates: dict[int, OrderedDict] = {}  # node -> the update it trained this round

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def _train(self, msg: Message, context: Context) -> Message:
        received = to_numpy(msg.content[protocol.ARRAYS])
        rnd = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
        update = _update(context.node_id, rnd, received, self.norm)
        self.updates[context.node_id] = update
        local = OrderedDict((k, received[k] + update[k]) for k in received)
        metrics = MetricRecord(honest_metrics(dp=context.run_config.get("dp", "none"), secure_aggregation=True, **{
                                                 "num-examples": 10 + context.node_config["partition-id"],
                                                 "partition-id": context.node_config["partition-id"], "lora-rank": 2}))
        return Message(RecordDict({"arrays": to_record(local), "metrics": metrics}), reply_to=msg)

    def _answer(self, msg: Message, handler) -> Message:
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return handler(msg, context)
        except Exception as exc:  # what Flower sends back for a ClientApp that raised
            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def train(self, messages) -> list[Message]:
        # each client gets its own copy, as over the wire (Flower's FedAvg shares one content object)
        stack = lambda m, c: secagg_mod(m, c, lambda m, c: compression_mod(  # noqa: E731
            m, c, lambda m, c: fault_injection_mod(m, c, lambda m, c: privacy_mod(m, c, self._train))))
        return [self._answer(copy.deepcopy(m), stack) for m in messages]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            if self.rewrite is not None:
                self.rewrite(msg.content[protocol.SECAGG][protocol.SA_STAGE], msg.metadata.dst_node_id,
                             msg.content[protocol.SECAGG])
            reply = self._answer(msg, lambda m, c: fault_injection_mod(m, c, lambda m, c: answer_stage(m, c)))
            if self.tamper is not None:
                reply = self.tamper(msg.content[protocol.SECAGG][protocol.SA_STAGE], msg.metadata.dst_node_id,
                                    msg, reply)
            if reply is not None:
                replies.append(reply)
        return replies


def _round(settings: Settings, rnd: int = 1, rows: int = 30, **federation):
    chain = make_strategy(settings, MetricsHistory(), num_nodes=len(IDS))
    fed = _Federation(settings, **federation)
    messages = list(chain.configure_train(rnd, to_record(_global(rows)), ConfigRecord({}), fed))
    arrays, _ = chain.aggregate_train(rnd, fed.train(messages))
    return arrays, chain, fed


def _expected(fed: _Federation, contributors: list[int], clip: float, weighted: bool) -> OrderedDict:
    """The weighted mean of the contributors' clipped updates, added to the global: computed here."""
    weights = {nid: (10 + IDS.index(nid)) if weighted else 1 for nid in contributors}
    total = sum(weights.values())
    mean = OrderedDict()
    for key, value in _global().items():
        acc = np.zeros(value.shape)
        for nid in contributors:
            u = fed.updates[nid]
            acc += weights[nid] * u[key] * min(1.0, clip / update_norm(u))
        mean[key] = value + acc / total
    return mean


def _check_mean(arrays: ArrayRecord, expected: OrderedDict, chain, atol_units: float = 8.0) -> None:
    code = find_wrapper(chain, SecureAggregation).plan.code(100)
    got = to_numpy(arrays)
    for key in expected:  # stochastic rounding: each client's error is below one integer unit per coordinate
        assert np.allclose(got[key], expected[key], rtol=0, atol=atol_units / code.scale), key


def test_the_secure_weighted_mean_is_the_plaintext_one():
    settings = _settings(**{"secagg-bits": 24})
    arrays, chain, fed = _round(settings)
    secagg = find_wrapper(chain, SecureAggregation)
    assert secagg.drops == [] and secagg.stats[1]["secagg/contributors"] == len(IDS)
    _check_mean(arrays, _expected(fed, IDS, settings.secagg_clip_norm, weighted=True), chain)
    # and it is the sum of the rounded updates, not a copy of one: a wrong weight would move it
    assert not np.allclose(to_numpy(arrays)["m.lora_A.weight"],
                           _expected(fed, IDS, settings.secagg_clip_norm, weighted=False)["m.lora_A.weight"], atol=1e-4)


def test_fedadam_steps_on_the_secure_mean_as_on_the_plaintext_one():
    plain = Settings.from_run_config({"strategy": "fedadam", "lora-rank": 2, "min-nodes": 2, "fraction-train": 1.0})
    arrays_plain, _, _ = _round(plain)
    arrays_secure, _, _ = _round(_settings(strategy="fedadam", **{"secagg-bits": 24}))
    for key, value in to_numpy(arrays_plain).items():
        assert np.allclose(to_numpy(arrays_secure)[key], value, atol=1e-4), key


def test_updates_are_clipped_before_they_are_encoded(monkeypatch):
    seen = []
    original = secagg_mod_module.encode_integer

    def spy(update, code, rng):
        seen.append(float(np.linalg.norm(update)))
        return original(update, code, rng)

    monkeypatch.setattr(secagg_mod_module, "encode_integer", spy)
    settings = _settings(**{"secagg-bits": 24, "secagg-clip-norm": 0.2})
    arrays, chain, fed = _round(settings, norm=1.0)  # every update has norm 5 C
    assert len(seen) == len(IDS) and max(seen) <= 0.2 * (1 + 1e-6)
    _check_mean(arrays, _expected(fed, IDS, 0.2, weighted=True), chain)
    # under distributed DP the bound is the DP clipping norm, which the noise is calibrated to
    seen.clear()
    _round(_settings(dp="distributed", **{"dp-clip-norm": 0.3}), norm=1.5)
    assert len(seen) == len(IDS) and max(seen) <= 0.3 * (1 + 1e-6) and min(seen) >= 0.3 * (1 - 1e-6)


@pytest.mark.parametrize("fault", ["crash", "vanish-share", "vanish-mask", "vanish-unmask"])
def test_thirty_percent_vanishing_at_any_stage_leave_the_mean_of_the_contributors(fault):
    settings = _settings(**{"secagg-bits": 24, "inject-faults": f"{fault}=0.3"})
    gone = {nid for i, nid in enumerate(IDS) if fault_of(settings.fault_fractions, i, len(IDS), settings.seed, 1)}
    assert len(gone) == 3
    arrays, chain, fed = _round(settings)
    secagg = find_wrapper(chain, SecureAggregation)
    # a client that vanished after sending its masked vector still counts; before it, it does not
    contributors = IDS if fault == "vanish-unmask" else [nid for nid in IDS if nid not in gone]
    _check_mean(arrays, _expected(fed, contributors, settings.secagg_clip_norm, weighted=True), chain)
    if fault != "crash":  # a training crash is an error reply, counted where every failed reply is
        stage = fault.removeprefix("vanish-")
        assert {d["node"] for d in secagg.drops} == gone
        assert all(d["round"] == 1 and f"{stage}: no reply" in d["reason"] and "injected fault" in d["reason"]
                   for d in secagg.drops)


def test_below_the_threshold_the_round_releases_nothing_and_says_why():
    # the plan survives 1 of 10 gone (secagg-dropout 0.1); 3 vanish, 7 are left against t = 8
    settings = _settings(**{"secagg-threshold": 8, "secagg-dropout": 0.1, "inject-faults": "vanish-mask=0.3"})
    arrays, chain, _ = _round(settings)
    assert arrays is None
    secagg = find_wrapper(chain, SecureAggregation)
    assert secagg.stats[1]["secagg/aborted"] == 1.0
    assert any(d["node"] is None and "mask: 7 clients left, threshold 8" in d["reason"] for d in secagg.drops)


def _garbage(stage: str, node: int, request: Message, reply: Message) -> Message:
    if node != IDS[4] or reply.has_error():
        return reply
    if stage == "mask":
        return Message(RecordDict({"arrays": ArrayRecord({"masked": to_record(
            {"x": np.zeros(3, np.float64)})["x"]})}), reply_to=request)
    return Message(RecordDict({"secagg": ConfigRecord({"to": b"123", "ciphertexts": [b"x"], "owners": b"1",
                                                       "shares": [b"y", b"z"]})}), reply_to=request)


@pytest.mark.parametrize("stage", ["share", "mask", "unmask"])
def test_a_malformed_stage_reply_drops_only_its_sender(stage):
    tamper = lambda s, n, q, r: _garbage(s, n, q, r) if s == stage else r  # noqa: E731
    settings = _settings(**{"secagg-bits": 24})
    arrays, chain, fed = _round(settings, tamper=tamper)
    secagg = find_wrapper(chain, SecureAggregation)
    assert [d["node"] for d in secagg.drops] == [IDS[4]] and f"{stage}: malformed" in secagg.drops[0]["reason"]
    contributors = IDS if stage == "unmask" else [n for n in IDS if n != IDS[4]]  # its vector came before
    _check_mean(arrays, _expected(fed, contributors, settings.secagg_clip_norm, weighted=True), chain)


def test_a_client_refuses_a_code_with_less_noise_than_the_train_config_promised():
    def cheat(stage, node, record):  # the server announces half the noise share to one client
        if stage == "mask" and node == IDS[0]:
            record["code-noise_variance"] = record["code-noise_variance"] / 2

    settings = _settings(dp="distributed", **{"dp-noise-multiplier": 1.0})
    arrays, chain, _ = _round(settings, rewrite=cheat)
    secagg = find_wrapper(chain, SecureAggregation)
    assert [d["node"] for d in secagg.drops] == [IDS[0]]
    assert "is below the" in secagg.drops[0]["reason"] and "the train config promised" in secagg.drops[0]["reason"]
    assert arrays is not None  # the other nine complete the round


def test_distributed_dp_puts_the_accounted_noise_in_the_released_mean():
    sigma = 1.0
    settings = _settings(dp="distributed", **{"dp-noise-multiplier": sigma, "secagg-bits": 20})
    arrays, chain, fed = _round(settings, rows=4000, norm=0.0)  # zero updates: what is released is the noise
    plan = find_wrapper(chain, SecureAggregation).plan
    dim = 2 * 4000 + 40
    code = plan.code(dim)
    noise = np.concatenate([(to_numpy(arrays)[k] - v).ravel() for k, v in _global(4000).items()])
    # ten contributors, each a share mu / t of mu = (sigma Delta_2)^2 integer units, decoded and averaged
    expected = np.sqrt(len(IDS) * code.noise_variance) / code.scale / len(IDS)
    assert abs(noise.std() / expected - 1) < 0.03
    assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size)
    # the ledger charges the Skellam bound of t honest shares: at least the Gaussian mechanism's epsilon
    ledger = find_wrapper(chain, DistributedSkellam)
    spent = ledger.privacy_spent()
    assert spent.num_releases == 1 and spent.epsilon == pytest.approx(plan.epsilon(dim, 1, settings.dp_delta))
    assert spent.epsilon >= gaussian_epsilon(sigma, 1, settings.dp_delta)


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "fedmedian"}, "strategy 'FedMedian': secure aggregation hands the server only the weighted sum"),
    ({"strategy": "krum"}, "strategy 'Krum'"),
    ({"strategy": "flora"}, "strategy 'FLoRA'"),
    ({"strategy": "hetlora"}, "strategy 'HetLoRA'"),
    ({"strategy": "qfedavg", "local-optimizer": "sgd"}, "strategy 'QFedAvg'"),
    ({"dp": "central-server"}, "'dp' = 'central-server': the server clips each client's update"),
    ({"dp": "local"}, "'dp' = 'local'"),
    ({"codec": "q8"}, "'codec' = 'q8': secure aggregation rounds each update"),
    ({"secure-aggregation": False, "dp": "distributed"}, "'dp' = 'distributed' needs 'secure-aggregation' = true"),
    ({"secagg-threshold": 11}, "'secagg-threshold' = 11: must be in 6..10"),
    ({"secagg-threshold": 2}, "'secagg-threshold' = 2: must be in 6..10 .* below a majority of it, a server that lies"),
    ({"secagg-threshold": 8, "secagg-dropout": 0.3}, "'secagg-threshold' = 8 with 'secagg-dropout' = 0.3: a round where 3 of its 10 "
                              "clients vanish keeps 7 < t"),
    ({"secagg-dropout": 1.0}, "'secagg-dropout' = 1.0: must be a fraction in"),
    ({"dp": "distributed", "secagg-clip-norm": 3.0}, "'secagg-clip-norm' = 3 with 'dp' = 'distributed'"),
])
def test_what_cannot_run_under_secure_aggregation_is_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_strategy(_settings(**overrides), MetricsHistory(), num_nodes=len(IDS))


CODECS = ["fp32", "fp16", "bf16", "q8", "q4", "q2", "q4-row", "topk0.1", "topk0.1+q4"]
ACCEPTED_DP = ("none", "dp-sgd", "distributed")  # dp-sgd's noise is Opacus's, before any encoding


@pytest.mark.parametrize("dp", DP_MODES)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("feedback", [True, False])
def test_every_dp_mode_codec_and_feedback_under_secure_aggregation_holds_or_is_refused(dp, codec, feedback):
    """Secure aggregation rounds fp32 updates itself, and only none, dp-sgd and distributed DP compose with
    it; every other pairing is refused naming its keys, before any client (a chain that builds is a run that
    starts: the accepted pairings' rounds are the tests above)."""
    overrides = {"dp": dp, "codec": codec, "error-feedback": feedback}
    if dp in ACCEPTED_DP and codec == "fp32":
        chain = make_strategy(_settings(**overrides), MetricsHistory(), num_nodes=len(IDS))
        assert find_wrapper(chain, SecureAggregation) is not None
        assert (find_wrapper(chain, DistributedSkellam) is not None) == (dp == "distributed")
        return
    with pytest.raises(ConfigError) as err:
        make_strategy(_settings(**overrides), MetricsHistory(), num_nodes=len(IDS))
    assert "'secure-aggregation'" in str(err.value) or "'codec'" in str(err.value)
    assert (f"'dp' = '{dp}'" in str(err.value)) if dp not in ACCEPTED_DP else f"'codec' = '{codec}'" in str(err.value)


def test_a_round_never_sums_more_clients_than_its_code_was_sized_for():
    """The plan (and the ring's width, the noise shares, the ledger) is sized when the ServerApp starts: here
    for 2 nodes. Ten connect; Flower's FedAvg samples all ten. The round aggregates at most the plan's two,
    so the ring sum cannot wrap and the released mean is exactly theirs (audit item 1: 10 summed into a ring
    sized for 2 moved the mean by 0.17 on coordinates of ~0.14, silently)."""
    settings = _settings(**{"secagg-bits": 16})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=2)
    fed = _Federation(settings)
    messages = list(chain.configure_train(1, to_record(_global()), ConfigRecord({}), fed))
    arrays, _ = chain.aggregate_train(1, fed.train(messages))
    secagg = find_wrapper(chain, SecureAggregation)
    assert secagg.plan.clients == 2 and len(messages) == 2
    assert secagg.stats[1]["secagg/contributors"] == 2 and secagg.stats[1]["secagg/capped"] == 8
    contributors = [m.metadata.dst_node_id for m in messages]
    _check_mean(arrays, _expected(fed, contributors, settings.secagg_clip_norm, weighted=True), chain)


def test_replies_from_outside_the_round_cohort_are_not_summed():
    """A reply whose node was not sent this round's instruction never enters the sum (the ring was sized for
    the cohort)."""
    settings = _settings(**{"secagg-bits": 24})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=len(IDS))
    fed = _Federation(settings)
    messages = list(chain.configure_train(1, to_record(_global()), ConfigRecord({}), fed))
    replies = fed.train(messages[:-1])
    stranger = copy.deepcopy(messages[-1])  # a reply from a node nobody asked, claiming to answer the round
    extra = fed.train([stranger])[0]
    extra.metadata.__dict__["_src_node_id"] = 12345
    arrays, _ = chain.aggregate_train(1, replies + [extra])
    secagg = find_wrapper(chain, SecureAggregation)
    assert any(d["node"] == 12345 and "not in this round's cohort" in d["reason"] for d in secagg.drops)
    asked = [m.metadata.dst_node_id for m in messages[:-1]]
    _check_mean(arrays, _expected(fed, asked, settings.secagg_clip_norm, weighted=True), chain)
