"""A third-party strategy package: pip-installed, found by entry point, run by name."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import strategies
from conftest import ONE_ACTOR
from fedmm import cli
from fedmm.deploy.simulation import run_simulation
from fedmm.pretrain import ensure_base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().parent / "plugin_pkg"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed_plugin():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Offline and exactly as a user would: a wheel built from the package's own pyproject.
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", str(PLUGIN)], check=True)
    importlib.invalidate_caches()
    yield "fedavg-server-lr"
    subprocess.run([*pip, "uninstall", "-y", "fedmm-plugin-example"], check=True)
    importlib.invalidate_caches()


def test_installed_plugin_is_listed_with_its_arguments(installed_plugin, capsys):
    assert installed_plugin in strategies.available()
    assert cli.main(["strategies"]) == 0
    listing = capsys.readouterr().out
    assert f"{installed_plugin}: FedAvg that moves the global arrays only server_lr" in listing
    assert "    server_lr (float, default 1.0)" in listing


def test_the_plugin_selected_by_name_aggregates_with_its_own_rule(installed_plugin, base_settings, monkeypatch):
    """The server-only plugin through fedmm's strategy builder (its argument checked and passed) and its own
    aggregation: server_lr=0 keeps the global arrays where they were, whatever the clients send (FedAvg's would
    move them). The federation by name runs in the FedDyn test below."""
    import numpy as np
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmm.config import Settings
    from fedmm.protocol import to_numpy, to_record
    from server.chain import make_strategy
    from server.history import MetricsHistory

    for attr in ("_run_id", "_node_id", "_task_id"):  # messages made outside a ServerApp
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    settings = Settings.from_run_config({**base_settings.to_run_config(), "strategy": installed_plugin,
                                         "strategy-args": "server_lr=0.0"})
    strategy = make_strategy(settings, MetricsHistory())
    assert type(strategy).__name__ == "FedAvgServerLR" and strategy.server_lr == 0.0

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    current = {"m.lora_A.weight": np.ones((2, 2), np.float32)}
    sent = list(strategy.configure_train(1, to_record(current), ConfigRecord({}), Grid()))
    replies = [Message(RecordDict({"arrays": to_record({"m.lora_A.weight": np.full((2, 2), 9.0, np.float32)}),
                                   "metrics": MetricRecord({"num-examples": 3})}), reply_to=m) for m in sent]
    new, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(to_numpy(new)["m.lora_A.weight"], current["m.lora_A.weight"])


def test_a_third_party_method_with_a_client_half_runs_by_name(installed_plugin, base_settings, tmp_path,
                                                              monkeypatch):
    """FedDyn from the installed package (tests/plugin_pkg/fedmm_plugin_example/feddyn.py): its server half
    aggregates, its client half adds the dynamic term and keeps its gradient state; no fedmm file names it."""
    from fedmm.methods import method_class

    assert "feddyn" in strategies.available()
    client_half = method_class("feddyn")
    assert client_half.__module__ == "fedmm_plugin_example.feddyn" and client_half.name == "feddyn"
    ensure_base_checkpoint(base_settings, progress=False)
    out = tmp_path / "report"
    run_config = {
        **base_settings.to_run_config(),
        "num-server-rounds": 2, "local-steps": 6, "fraction-evaluate": 0.5, "partitioner": "iid",
        "strategy": "feddyn", "strategy-args": "alpha=0.05", "output-dir": str(out),
    }
    code = run_simulation(ROOT, run_config, num_supernodes=3, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["strategy"] == "feddyn"
    rounds = metrics["rounds"]
    assert rounds["2"]["train/num-replies"] == 3 and rounds["2"]["central/loss"] != rounds["0"]["central/loss"]
    # the server half's rule, on two replies: h = -alpha |P|/m mean(theta_k - theta); theta+ = mean - h / alpha
    import numpy as np
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedmm.protocol import to_numpy, to_record

    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # messages made outside a ServerApp
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    server_half = strategies.load("feddyn")(alpha=0.5, min_train_nodes=2, min_available_nodes=2)

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3, 4]

    theta = {"m.lora_A.weight": np.zeros((2, 2), np.float32)}
    sent = list(server_half.configure_train(1, to_record(theta), ConfigRecord({}), Grid()))
    assert sent[0].content["config"]["feddyn-alpha"] == 0.5
    replies = [Message(RecordDict({"arrays": to_record({"m.lora_A.weight": np.full((2, 2), v, np.float32)}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
               for v, m in zip((1.0, 3.0, 5.0, 7.0), sent)]
    new, _ = server_half.aggregate_train(1, replies)
    mean = np.mean([1.0, 3.0, 5.0, 7.0][: len(sent)])
    h = -0.5 * len(sent) / 4 * mean
    np.testing.assert_allclose(to_numpy(new)["m.lora_A.weight"], mean - h / 0.5, rtol=1e-6)
