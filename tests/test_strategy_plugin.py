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


def test_federation_runs_the_plugin_selected_by_name(installed_plugin, base_settings, tmp_path):
    ensure_base_checkpoint(base_settings, progress=False)
    out = tmp_path / "report"
    run_config = {
        **base_settings.to_run_config(),
        "num-server-rounds": 2, "local-steps": 8, "fraction-evaluate": 0.5, "partitioner": "iid",
        "strategy": installed_plugin, "strategy-args": "server_lr=0.0",
        "output-dir": str(out),
    }
    code = run_simulation(ROOT, run_config, num_supernodes=3, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["strategy"] == installed_plugin
    rounds = metrics["rounds"]
    assert rounds["2"]["train/num-replies"] == 3 and rounds["2"]["train/train-loss"] > 0  # clients trained...
    # ...but server_lr=0 keeps the global adapter where it started: the plugin's own aggregation ran
    # (FedAvg's moves it; see the other simulation tests)
    assert [rounds[str(r)]["central/zs-acc"] for r in (1, 2)] == [rounds["0"]["central/zs-acc"]] * 2
    assert rounds["2"]["central/loss"] == rounds["0"]["central/loss"]
