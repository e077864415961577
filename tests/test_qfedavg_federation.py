"""QFedAvg in Flower's simulation engine, with the obligation it puts on its clients."""

import json
from pathlib import Path

import pytest

from conftest import ONE_ACTOR
from fedmm.deploy.simulation import run_simulation
from fedmm.pretrain import ensure_base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_qfedavg_runs_in_simulation_with_its_client_obligation(base_settings, tmp_path):
    """QFedAvg's clients report F_k(w) and run plain SGD (its L = 1/lr): the global model learns.

    With AdamW clients its step was ~1% of FedAvg's and accuracy did not move in two rounds.
    """
    ensure_base_checkpoint(base_settings, progress=False)
    out = tmp_path / "report"
    run_config = {
        **base_settings.to_run_config(),
        "num-server-rounds": 2, "local-steps": 6, "local-optimizer": "sgd", "lr": 0.3, "partitioner": "iid",
        "strategy": "qfedavg", "strategy-args": "q=0.2",
        "output-dir": str(out),
    }
    code = run_simulation(ROOT, run_config, num_supernodes=4, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False, timeout=900)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    rounds = {int(k): v for k, v in json.loads((out / "metrics.json").read_text())["rounds"].items()}
    assert rounds[2]["train/num-replies"] == 4
    # F_k(w) of the global model each round: it falls as the model learns
    assert 0 < rounds[2]["train/train_loss"] < rounds[1]["train/train_loss"]
    assert rounds[2]["central/zs-acc"] > rounds[0]["central/zs-acc"] + 0.03, (rounds[0], rounds[2])
