"""The default model (published towers, heads aligned) in Flower's simulation engine."""

import json
from pathlib import Path

import pytest

from conftest import ONE_ACTOR
from fedmm.deploy.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_default_model_federates_with_frozen_published_towers(default_model_settings, tmp_path):
    """The default effnet-lite0-minilm: heads aligned on the public split, then federated LoRA."""
    out = tmp_path / "report"
    run_config = {
        **default_model_settings.to_run_config(),
        "num-server-rounds": 2,
        "local-steps": 6,
        "fraction-evaluate": 0.5,
        "partitioner": "iid",
        "output-dir": str(out),
    }
    code = run_simulation(ROOT, run_config, num_supernodes=3, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False, timeout=900)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == "effnet-lite0-minilm"
    rounds = {int(k): v for k, v in metrics["rounds"].items()}
    assert rounds[2]["train/num-replies"] == 3
    assert rounds[2]["central/zs-acc"] > rounds[0]["central/zs-acc"] + 0.05, (rounds[0], rounds[2])
