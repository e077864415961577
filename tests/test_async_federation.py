"""Asynchronous buffered aggregation in a real federation (Flower's simulation engine on 127.0.0.1).

A tier of slow nodes (a real delay), the buffer filling from whoever is done:
it learns, and the slow node's updates are the stale ones. Resume mid-run and
the deployment engine: tests/test_deployment.py.
"""

import json
from pathlib import Path

import pytest

from fedmm.deploy.simulation import run_simulation
from fedmm.pretrain import ensure_base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_asynchronous_simulation_learns_and_the_slow_tier_is_stale(base_settings, tmp_path):
    ensure_base_checkpoint(base_settings, progress=False)
    out = tmp_path / "report"
    job = {**base_settings.to_run_config(), "asynchronous": True, "buffer-size": 3, "local-steps": 12,
           "partitioner": "iid", "num-server-rounds": 7, "output-dir": str(out),
           "client-profiles": "slow: delay=4; fast:", "partition-profiles": "slow,fast,fast,fast"}
    assert run_simulation(ROOT, job, num_supernodes=4, flwr_home=tmp_path / "home", stream=True, timeout=900) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = {int(k): v for k, v in metrics["rounds"].items()}
    assert sorted(rounds) == list(range(8))
    assert all(rounds[r]["async/updates"] == 3 and rounds[r]["train/num-replies"] == 3 for r in range(1, 8))
    # it learns (one aggregation's accuracy moves by a few points either way on the tiny model: the last three)
    late = sum(rounds[r]["central/zs-acc"] for r in (5, 6, 7)) / 3
    assert late > rounds[0]["central/zs-acc"] + 0.04, [rounds[r]["central/zs-acc"] for r in sorted(rounds)]
    assert rounds[7]["evaluate/num-replies"] == 4  # the clients evaluate the final global once

    train = [c for c in metrics["clients"] if c["phase"] == "train"]
    assert len(train) == 21
    for c in train:
        assert c["staleness"] == c["round"] - 1 - c["trained-on-version"] >= 0
    slow = [c["staleness"] for c in train if c["partition-id"] == 0]
    fast = [c["staleness"] for c in train if c["partition-id"] != 0]
    assert len(fast) > 2 * len(slow) and (not slow or max(slow) > min(fast)), (slow, fast)
    assert (out / "staleness.png").stat().st_size > 0
    assert "## Asynchronous aggregation (per client)" in (out / "summary.md").read_text()
