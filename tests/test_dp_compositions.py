"""Every (dp mode x codec x error feedback) combination either holds or is refused.

A Gaussian mechanism's epsilon holds only if the update its noise is added to
has norm <= C, the clipping norm the noise is calibrated to. For every
accepted combination this runs real rounds through the client's mods
(compression_mod around privacy_mod, error-feedback residuals carried in
``context.state``) and the server's chain (``make_strategy``), with client
updates of norm 5 C, and records the norm of what enters the noise step:
the client's noise (local, distributed: ``add_gaussian_noise``) or the
server's (central: the updates Flower's DP wrapper hands to FedAvg, whose
mean it then noises). The refused combinations must raise a ConfigError
naming both keys. dp-sgd noises per-sample gradients inside Opacus, before
any codec, so every codec is post-processing there (tests/test_privacy.py
checks its clipping and accounting); it is checked here to be accepted.
"""

from __future__ import annotations

import copy
import random
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

import strategies
from clients.compression_mod import compression_mod
from clients.privacy_mod import privacy_mod
from fedmm.compression import make_codec
from fedmm.config import DP_MODES, ConfigError, Settings
from fedmm.methods import CarriesMethodArrays
from fedmm.privacy import update as dp_update
from fedmm.privacy import update_norm
from server.chain import find_wrapper, make_strategy
from server.history import MetricsHistory
from strategies.compression import CompressedUpdates
from fedmm.protocol import to_numpy, to_record
from conftest import honest_metrics

CODECS = ["fp32", "fp16", "bf16", "q8", "q4", "q2", "q4-row", "topk0.1", "topk0.1+q4"]
CLIP = 0.5
NODES = 4
ROUNDS = 3


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _settings(dp: str, codec: str, feedback: bool) -> Settings:
    return Settings.from_run_config({"dp": dp, "codec": codec, "error-feedback": feedback, "dp-clip-norm": CLIP,
                                     "lora-rank": 2, "min-nodes": 2, "dp-noise-multiplier": 0.3})


def _global() -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict([("m.lora_A.weight", rng.normal(size=(2, 30)).astype(np.float32)),
                        ("m.lora_B.weight", rng.normal(size=(20, 2)).astype(np.float32))])


class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(range(1, NODES + 1))


def _trainer(rnd: int, dp: str):
    """The ClientApp's handler, reduced to its contract: local = received global + an update of norm 5 C."""

    def handler(msg: Message, context: Context) -> Message:
        received = to_numpy(msg.content["arrays"])
        rng = np.random.default_rng([context.node_id, rnd])
        raw = OrderedDict((k, rng.normal(size=v.shape).astype(np.float32)) for k, v in received.items())
        scale = 5 * CLIP / update_norm(raw)
        local = OrderedDict((k, received[k] + scale * raw[k]) for k in received)
        metrics = MetricRecord(honest_metrics(dp=dp, **{
            "num-examples": 10, "partition-id": context.node_id - 1, "lora-rank": 2}))
        return Message(RecordDict({"arrays": to_record(local), "metrics": metrics}), reply_to=msg)

    return handler


def _noised_norms(settings: Settings, monkeypatch) -> list[float]:
    """Norms of every update that entered a noise step over ROUNDS rounds of the client mods and server chain."""
    norms: list[float] = []
    original = dp_update.add_gaussian_noise

    def client_noise(clipped, std, rng):
        norms.append(update_norm(clipped))
        return original(clipped, std, rng)

    monkeypatch.setattr(dp_update, "add_gaussian_noise", client_noise)
    chain = make_strategy(settings, MetricsHistory(), num_nodes=NODES)
    inner = strategies.innermost(chain)
    codec = find_wrapper(chain, CompressedUpdates)
    dp = next(s for s in strategies.wrapper_chain(chain) if hasattr(s, "clipping_norm"))
    aggregate = inner.aggregate_train

    def server_noise(server_round, replies):  # FedAvg's mean of these is what Flower's wrapper noises
        replies = list(replies)
        # central-server clips against its own global; central-client's clients clipped against the decoded one
        ref = to_numpy(dp.current_arrays) if settings.dp == "central-server" else codec._reference
        for msg in replies:
            local = to_numpy(msg.content["arrays"])
            norms.append(update_norm(OrderedDict((k, local[k] - ref[k]) for k in local)))
        return aggregate(server_round, replies)

    if settings.dp in ("central-server", "central-client"):
        inner.aggregate_train = server_noise
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                for n in range(1, NODES + 1)}
    arrays = to_record(_global())
    if isinstance(inner, CarriesMethodArrays):  # a method's arrays ride in the update (SCAFFOLD's c)
        arrays = inner.with_method_arrays(arrays)
    for rnd in range(1, ROUNDS + 1):
        random.seed(rnd)
        messages = list(chain.configure_train(rnd, arrays, ConfigRecord({}), _Grid()))
        handler = _trainer(rnd, settings.dp)
        # each client gets its own copy, as over the wire (Flower's FedAvg shares one content object)
        messages = [copy.deepcopy(m) for m in messages]
        replies = [compression_mod(m, contexts[m.metadata.dst_node_id],
                                   lambda msg, ctx: privacy_mod(msg, ctx, handler)) for m in messages]
        assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
        new, _ = chain.aggregate_train(rnd, replies)
        assert new is not None, f"round {rnd} released nothing"
        arrays = new
    return norms


COMBINATIONS = [(dp, codec, fb) for dp in DP_MODES if dp != "none" for codec in CODECS for fb in (True, False)]


def _refused(dp: str, codec: str) -> bool:
    # distributed DP is only valid under secure aggregation (tests/test_secagg_rounds.py runs it there)
    return dp == "distributed" or dp == "central-client" and codec != "fp32"


@pytest.mark.parametrize("dp,codec,feedback", COMBINATIONS, ids=[f"{d}-{c}-{'ef' if f else 'noef'}"
                                                                 for d, c, f in COMBINATIONS])
def test_each_combination_holds_or_is_refused(dp, codec, feedback, monkeypatch):
    if _refused(dp, codec):
        with pytest.raises(ConfigError) as err:
            _settings(dp, codec, feedback)
        assert f"'dp' = '{dp}'" in str(err.value)
        assert ("'codec'" if codec != "fp32" else "'secure-aggregation'") in str(err.value)
        return
    settings = _settings(dp, codec, feedback)
    if dp == "dp-sgd":
        return  # accepted: its noise is Opacus's, on per-sample gradients, before any codec
    norms = _noised_norms(settings, monkeypatch)
    assert len(norms) == NODES * ROUNDS
    assert max(norms) <= CLIP * (1 + 1e-5), f"an update of norm {max(norms):.4f} > C = {CLIP} entered the noise step"
    assert min(norms) >= CLIP * (1 - 1e-3)  # clipped to C, not dropped: the test saw real updates


def test_the_unrefused_central_client_would_break_the_bound(monkeypatch):
    """What the refusal prevents: with q2 and error feedback, central-client's server noises norms > C."""
    monkeypatch.setattr(Settings, "_check_privacy_pairings", lambda self: None)
    norms = _noised_norms(_settings("central-client", "q2", True), monkeypatch)
    assert max(norms) > 1.3 * CLIP


def test_a_strategy_that_reads_client_losses_is_refused_under_dp():
    from server.chain import make_strategy as build

    for dp in ("dp-sgd", "local"):
        settings = Settings.from_run_config({"dp": dp, "strategy": "qfedavg", "local-optimizer": "sgd"})
        with pytest.raises(ConfigError, match=f"'strategy' = 'qfedavg' with 'dp' = '{dp}'"):
            build(settings, MetricsHistory())


def _central_round(dp: str, outlier: float | None) -> tuple[object, object]:
    """One central-DP round of five clients with small updates, the fifth replaced by ``outlier`` if given."""
    settings = Settings.from_run_config({"dp": dp, "dp-clip-norm": CLIP, "lora-rank": 2, "min-nodes": 2,
                                         "dp-noise-multiplier": 0.3})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=5)

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3, 4, 5]

    random.seed(1)
    glob = _global()
    messages = list(chain.configure_train(1, to_record(glob), ConfigRecord({}), Grid()))
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        rng = np.random.default_rng(node)
        delta = OrderedDict((k, (0.01 * rng.normal(size=v.shape)).astype(np.float32)) for k, v in glob.items())
        if node == 5 and outlier is not None:
            delta = OrderedDict((k, (v * 0 + outlier).astype(np.float32)) for k, v in delta.items())
        metrics = MetricRecord(honest_metrics(dp=dp, **{"num-examples": 10, "partition-id": node - 1, "lora-rank": 2}))
        payload = make_codec("fp32").encode(delta, np.random.default_rng(0))  # what compression_mod sends
        replies.append(Message(RecordDict({"arrays": to_record(payload), "metrics": metrics}), reply_to=msg))
    arrays, _ = chain.aggregate_train(1, replies)
    return arrays, chain


@pytest.mark.parametrize("dp", ["central-server", "central-client"])
@pytest.mark.parametrize("outlier", [None, 1e3, np.nan, 0.0], ids=["honest", "norm-1e5x", "nan", "zero"])
def test_under_central_dp_one_clients_update_cannot_decide_whether_a_round_is_released(dp, outlier):
    """Audit item 3: UpdateValidation dropped an update above 10x the round's median norm, and Flower's
    accounted wrapper then released nothing for the round: one client's data switched a round between
    released and not, uncharged (and an update of exactly zero made Flower's server-side clipping divide by
    zero, which ended the run). Under central DP every reply reaches the wrapper (which clips), and a
    payload that does not decode (the
    codec refuses non-finite values) enters as a zero update: the round is released and accounted whatever client 5 sent."""
    arrays, chain = _central_round(dp, outlier)
    assert arrays is not None
    dp_wrapper = next(s for s in strategies.wrapper_chain(chain) if hasattr(s, "privacy_spent"))
    assert dp_wrapper.privacy_spent().num_releases == 1
    codec = find_wrapper(chain, CompressedUpdates)  # the fp32 codec refuses the NaN: it enters as zero
    assert codec.stats[1]["dropped-updates"] == 0
    assert codec.stats[1].get("zeroed-updates", 0) == (1 if outlier is not None and np.isnan(outlier) else 0)
    assert all(np.all(np.isfinite(v)) for v in to_numpy(arrays).values())


METHODS = ["scaffold", "ditto", "local-heads"]
METHOD_COMBINATIONS = [(m, dp) for m in METHODS for dp in DP_MODES if dp not in ("none", "distributed")]


@pytest.mark.parametrize("method,dp", METHOD_COMBINATIONS, ids=[f"{m}-{d}" for m, d in METHOD_COMBINATIONS])
def test_each_method_holds_or_is_refused_under_each_dp_mode(method, dp, monkeypatch):
    """Methods with a client half: what a reply carries beyond the adapter (SCAFFOLD's control-variate delta, a
    second vector of the update's size) is inside the clipping, so every update entering the noise step, the
    method's arrays included, has norm <= C; a method whose local work a mode cannot cover is refused, naming
    both keys. Ditto's and local heads' personal parts never leave the client, so their replies are FedAvg's."""
    config = {"dp": dp, "codec": "fp32", "dp-clip-norm": CLIP, "lora-rank": 2, "min-nodes": 2,
              "dp-noise-multiplier": 0.3, "strategy": method, "local-optimizer": "sgd"}
    settings = Settings.from_run_config(config)
    if method == "local-heads" and dp == "dp-sgd":
        with pytest.raises(ConfigError, match="'strategy' = 'local-heads' with 'dp' = 'dp-sgd'"):
            make_strategy(settings, MetricsHistory(), num_nodes=NODES)
        return
    if method == "scaffold" and dp.startswith("central"):  # its aggregate is not FedAvg's, which the noise needs
        with pytest.raises(ValueError, match=f"'dp' = '{dp}'.*'Scaffold' aggregates otherwise"):
            make_strategy(settings, MetricsHistory(), num_nodes=NODES)
        return
    if dp == "dp-sgd":
        make_strategy(settings, MetricsHistory(), num_nodes=NODES)  # accepted: Opacus's noise, before any codec
        return
    norms = _noised_norms(settings, monkeypatch)
    assert len(norms) == NODES * ROUNDS
    assert max(norms) <= CLIP * (1 + 1e-5), f"an update of norm {max(norms):.4f} > C = {CLIP} entered the noise step"
    assert min(norms) >= CLIP * (1 - 1e-3)


def test_scaffolds_control_variate_is_part_of_the_clipped_update(monkeypatch):
    """The norm that enters the noise step is over the adapter's and the control variate's deltas together: with
    the control variate left out, the clipped updates would be shorter than C (the test would see it)."""
    settings = Settings.from_run_config({"dp": "local", "codec": "fp32", "dp-clip-norm": CLIP, "lora-rank": 2,
                                         "min-nodes": 2, "dp-noise-multiplier": 0.3, "strategy": "scaffold",
                                         "local-optimizer": "sgd"})
    entered: list[list[str]] = []
    original = dp_update.add_gaussian_noise

    def keys_noised(clipped, std, rng):
        entered.append(sorted(clipped))
        return original(clipped, std, rng)

    monkeypatch.setattr(dp_update, "add_gaussian_noise", keys_noised)
    _noised_norms(settings, monkeypatch)
    assert entered and all(any(k.endswith("@scaffold-c") for k in keys) for keys in entered)
    assert all(any(k.endswith("lora_A.weight") for k in keys) for keys in entered)
