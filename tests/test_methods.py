"""Methods with a client half (fedmm/methods/): SCAFFOLD, Ditto and local heads, through the real ClientApp,
SCAFFOLD's server half, and what a run refuses before any client is contacted."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.app import app as client_app
from fedmm import cli, lora, protocol
from fedmm.config import ConfigError, Settings
from fedmm.methods import composition_problem, method_class
from fedmm.pretrain import load_base_model
from fedmm.protocol import to_numpy, to_record
from strategies.scaffold import Scaffold

LR, STEPS = 0.05, 3


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture(scope="module")
def adapter(base_settings):
    net = lora.attach_lora(load_base_model(base_settings, progress=False), 8, 16.0, base_settings.lora_target_list)
    rng = np.random.default_rng(0)  # B != 0, so every LoRA factor has a gradient
    return OrderedDict((k, (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32))
                       for k, v in lora.get_adapter_arrays(net).items())


def _run_config(base_settings, strategy: str) -> dict:
    return {**base_settings.to_run_config(), "strategy": strategy, "local-steps": STEPS, "lr": LR,
            "local-optimizer": "sgd"}


def _message(arrays: dict, kind: str, config: dict | None = None) -> Message:
    content = RecordDict({"arrays": to_record(arrays),
                          "config": ConfigRecord({"server-round": 1, "local-steps": STEPS, "lr": LR, **(config or {})})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
                   run_config=run_config)


def test_scaffold_client_replies_with_option_two_control_variate_and_keeps_its_own(base_settings, adapter):
    """Option II: c_i+ = c_i - c + (x - y)/(K lr); the reply's control array is c + (c_i+ - c_i), the node keeps
    c_i+, and the next round's steps are corrected by c - c_i (a reply differs from one without the correction)."""
    context = _context(_run_config(base_settings, "scaffold"))
    rng = np.random.default_rng(1)
    c = {k: (1e-3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in adapter.items()}
    global_arrays = {**adapter, **{k + protocol.SCAFFOLD_CONTROL: v for k, v in c.items()}}
    reply = client_app(_message(global_arrays, MessageType.TRAIN), context)
    assert not reply.has_error(), reply.error
    out = to_numpy(reply.content["arrays"])
    assert set(out) == set(global_arrays)
    for k, x in adapter.items():
        c_new = -c[k] + (x - out[k]) / (STEPS * LR)  # c_i was zero
        np.testing.assert_allclose(out[k + protocol.SCAFFOLD_CONTROL], c[k] + c_new, rtol=1e-4, atol=1e-6)
    kept = method_class("scaffold")(ConfigRecord({}), context.state, LR, STEPS).load("c")
    assert kept is not None and not all(np.allclose(v, 0) for v in kept.values())
    again = to_numpy(client_app(_message(global_arrays, MessageType.TRAIN), context).content["arrays"])
    fresh = to_numpy(client_app(_message(global_arrays, MessageType.TRAIN),
                                _context(_run_config(base_settings, "scaffold"))).content["arrays"])
    assert any(not np.allclose(again[k], fresh[k]) for k in adapter)  # c - c_i != 0 moved the steps


def test_scaffold_server_moves_c_by_the_cohorts_share_of_the_mean_correction():
    """c+ = c + |S|/N mean(delta c_i); the adapter is FedAvg's mean."""
    strategy = Scaffold(fraction_train=0.5, min_train_nodes=2, min_available_nodes=2)
    base = OrderedDict([("m.lora_A.weight", np.ones((2, 3), np.float32)), ("m.lora_B.weight", np.ones((3, 2), np.float32))])
    arrays = strategy.with_method_arrays(to_record(base))
    plain = to_numpy(arrays)
    plain["m.lora_A.weight@scaffold-c"] += 0.5
    arrays = to_record(plain)

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3, 4]

    import random
    random.seed(0)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), Grid()))
    assert len(messages) == 2
    replies = []
    for i, msg in enumerate(messages):
        local = {k: v + (i + 1) for k, v in plain.items()}  # delta c_i = i + 1; y = x + i + 1
        replies.append(Message(RecordDict({"arrays": to_record(local), "metrics": MetricRecord({"num-examples": 5})}),
                               reply_to=msg))
    new, _ = strategy.aggregate_train(1, replies)
    out = to_numpy(new)
    np.testing.assert_allclose(out["m.lora_A.weight"], 1 + 1.5)  # FedAvg's mean
    np.testing.assert_allclose(out["m.lora_A.weight@scaffold-c"], 0.5 + 2 / 4 * 1.5)
    np.testing.assert_allclose(out["m.lora_B.weight@scaffold-c"], 0 + 2 / 4 * 1.5)


def test_ditto_replies_as_fedavg_and_evaluates_its_personal_adapter(base_settings, adapter):
    """The reply is FedAvg's (the personal adapter never leaves); the node keeps a personal adapter that differs
    from the global one, and its evaluate reply carries personal-* beside the global model's metrics."""
    ditto, fedavg = _context(_run_config(base_settings, "ditto")), _context(_run_config(base_settings, "fedavg"))
    reply = client_app(_message(adapter, MessageType.TRAIN, {protocol.DITTO_LAMBDA: 0.1}), ditto)
    plain = client_app(_message(adapter, MessageType.TRAIN), fedavg)
    assert not reply.has_error(), reply.error
    ours, theirs = to_numpy(reply.content["arrays"]), to_numpy(plain.content["arrays"])
    assert set(ours) == set(adapter) and all(np.array_equal(ours[k], theirs[k]) for k in adapter)
    personal = method_class("ditto")(ConfigRecord({}), ditto.state, LR, STEPS).load("personal")
    assert personal is not None and any(not np.allclose(personal[k], adapter[k]) for k in adapter)
    evaluated = client_app(_message(adapter, MessageType.EVALUATE), ditto).content["metrics"]
    baseline = client_app(_message(adapter, MessageType.EVALUATE), fedavg).content["metrics"]
    for key in protocol.EVALUATE_SCALARS:
        assert evaluated[key] == baseline[key]  # the global model's, as before
        assert protocol.PERSONAL + key in evaluated
    assert "personal-loss" in evaluated and evaluated["personal-loss"] != evaluated["loss"]


def test_local_heads_never_leave_the_client_and_personalize_its_evaluation(base_settings, adapter):
    context = _context(_run_config(base_settings, "local-heads"))
    reply = client_app(_message(adapter, MessageType.TRAIN), context)
    assert not reply.has_error(), reply.error
    assert set(to_numpy(reply.content["arrays"])) == set(adapter)  # the adapter only: no head
    heads = method_class("local-heads")(ConfigRecord({}), context.state, LR, STEPS).load("heads")
    base = load_base_model(base_settings, progress=False)
    originals = {n: p.detach().numpy() for n, p in base.named_parameters()}
    assert heads and all(k in originals for k in heads)
    assert any(not np.allclose(heads[k], originals[k]) for k in heads)  # trained with the adapter
    evaluated = client_app(_message(adapter, MessageType.EVALUATE), context).content["metrics"]
    baseline = client_app(_message(adapter, MessageType.EVALUATE),
                          _context(_run_config(base_settings, "fedavg"))).content["metrics"]
    assert evaluated["loss"] == baseline["loss"]  # the global model: the base's heads
    assert evaluated["personal-loss"] != evaluated["loss"]


@pytest.mark.parametrize("config,named", [
    ({"strategy": "scaffold", "local-optimizer": "adamw"}, "'local-optimizer' = 'adamw'"),
    ({"strategy": "scaffold", "local-optimizer": "sgd", "asynchronous": True}, "'asynchronous' = true"),
    ({"strategy": "scaffold", "local-optimizer": "sgd", "lora-ranks": "8,4"}, "tiers of different LoRA ranks"),
    ({"strategy": "local-heads", "dp": "dp-sgd"}, "'dp' = 'dp-sgd'"),
])
def test_a_method_the_run_cannot_carry_is_refused_before_any_client(config, named, monkeypatch, capsys):
    """fedmm run refuses, naming the key, before a process starts; the ServerApp's own check says the same."""
    import subprocess

    def no_process(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower()}" for k, v in config.items())
    assert cli.main(["run", "--run-config", overrides]) == 2
    assert named in capsys.readouterr().err
    try:
        settings = Settings.from_run_config(config)
    except ConfigError as exc:  # the tiers' own check got there first: also before any client
        assert named in str(exc)
        return
    from strategies import load

    problem = composition_problem(settings.strategy, load(settings.strategy), settings)
    assert problem is not None and named in problem


@pytest.mark.parametrize("config", [{"secure-aggregation": True}, {"codec": "topk0.1+q4"}, {"dp": "local"},
                                    {"dp": "dp-sgd"}])
def test_scaffold_composes_with_secure_aggregation_codecs_and_client_side_dp(config):
    """Its control-variate delta rides inside the update: summed under secure aggregation, encoded by the codec,
    clipped and noised with it (tests/test_dp_compositions.py measures the norm that enters the noise)."""
    from strategies import load

    from server.chain import make_strategy
    from server.history import MetricsHistory

    settings = Settings.from_run_config({"strategy": "scaffold", "local-optimizer": "sgd", "min-nodes": 2, **config})
    assert composition_problem("scaffold", load("scaffold"), settings) is None
    assert isinstance(make_strategy(settings, MetricsHistory()), Scaffold)  # the chain's own checks accept it


def test_the_report_gets_the_personal_evaluation_mean_and_worst_client():
    from server.history import MetricsHistory

    history = MetricsHistory()
    history.at_round(1)
    replies = [RecordDict({"metrics": MetricRecord({"num-examples": n, "unit-weight": 1, "partition-id": i,
                                                    "zs-acc": 0.5, "personal-zs-acc": acc})})
               for i, (n, acc) in enumerate([(10, 0.9), (30, 0.6)])]
    out = history.evaluate_aggr(replies, "num-examples")
    assert out["personal-zs-acc"] == pytest.approx((10 * 0.9 + 30 * 0.6) / 40)
    assert out["personal-client-acc-min"] == pytest.approx(0.6) and out["client-acc-min"] == pytest.approx(0.5)
    assert history.rounds[1]["evaluate/personal-client-acc-min"] == pytest.approx(0.6)


@pytest.mark.integration
def test_scaffold_runs_a_federation_under_secure_aggregation(base_settings, tmp_path):
    """End to end in Flower's simulation: c rides in the global record and in every masked reply; the report's
    adapter is the adapter alone."""
    import json
    from pathlib import Path

    from conftest import ONE_ACTOR
    from fedmm.deploy.simulation import run_simulation
    from fedmm.pretrain import ensure_base_checkpoint

    ensure_base_checkpoint(base_settings, progress=False)
    out = tmp_path / "report"
    run_config = {**base_settings.to_run_config(), "num-server-rounds": 2, "local-steps": 4, "lr": 0.05,
                  "local-optimizer": "sgd", "strategy": "scaffold", "secure-aggregation": True, "min-nodes": 3,
                  "partitioner": "iid", "output-dir": str(out)}
    code = run_simulation(Path(__file__).resolve().parents[1], run_config, num_supernodes=3, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert rounds["2"]["secagg/contributors"] == 3 and rounds["2"]["train/num-replies"] == 3
    assert rounds["2"]["central/zs-acc"] > 0
    from safetensors.numpy import load_file

    exported = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert exported and not any("scaffold" in k for k in exported)


def test_a_site_without_the_methods_client_half_declines_naming_it(base_settings, adapter):
    """The server names the method whose client half clients must run; a site that lacks it declines instead of
    training as FedAvg's clients would (a SCAFFOLD reply without its correction would bias c)."""
    context = _context(_run_config(base_settings, "fedavg"))
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = client_app(_message(adapter, kind, {protocol.METHOD: "fednova"}), context)
        assert reply.has_error() and "method 'fednova'" in reply.error.reason
        assert "fedmm.client_methods" in reply.error.reason
    assert not client_app(_message(adapter, MessageType.TRAIN, {protocol.METHOD: "ditto"}), context).has_error()
