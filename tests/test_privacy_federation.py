"""Differential privacy in a real simulation: per-client DP-SGD ledgers, and the central accountant's budget."""

import json
from pathlib import Path

import pytest

from conftest import ONE_ACTOR
from fedmm.deploy.simulation import run_simulation
from fedmm.pretrain import ensure_base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_dp_sgd_federation_accounts_per_client_and_stops_spent_clients(base_settings, tmp_path):
    from fedmm.data import load_splits, train_sizes
    from fedmm.privacy import sample_epsilon, sample_rate

    ensure_base_checkpoint(base_settings, progress=False)
    s, steps, nodes = base_settings, 4, 4
    sizes = train_sizes(s, load_splits(s.dataset)["clients"], nodes)

    def eps(n: int, rounds: int) -> float:
        return sample_epsilon([(1.0, sample_rate(n, s.batch_size), rounds * steps)], s.dp_delta)

    # every client affords two rounds, some a third, the client with the highest sampling rate not
    budget = max(max(eps(n, 2) for n in sizes), min(eps(n, 3) for n in sizes)) + 1e-6
    stopping = [pid for pid, n in enumerate(sizes) if eps(n, 3) > budget]
    assert 0 < len(stopping) < nodes, (sizes, budget)
    out = tmp_path / "report"
    run_config = {**s.to_run_config(), "num-server-rounds": 3, "local-steps": steps, "output-dir": str(out),
                  "dp": "dp-sgd", "dp-noise-multiplier": 1.0, "max-epsilon": budget}
    code = run_simulation(ROOT, run_config, num_supernodes=nodes, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False, timeout=900)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = {int(k): v for k, v in metrics["rounds"].items()}
    spent = [rounds[r]["train/dp-epsilon-max"] for r in (1, 2, 3)]
    assert spent[0] < spent[1] <= spent[2] <= budget
    # the weakest client's ledger after two rounds: every step counted, at Opacus's sampling rate
    assert spent[1] == pytest.approx(max(eps(n, 2) for n in sizes), rel=1e-9)
    assert rounds[1]["train/num-replies"] == rounds[2]["train/num-replies"] == nodes
    assert rounds[3]["train/num-replies"] == nodes - len(stopping)
    declined = [f for f in metrics["extra"]["failed-replies"] if "privacy budget spent" in f["reason"]]
    assert sorted(f["reason"].split(":")[0] for f in declined) == [f"partition {pid}" for pid in stopping]
    assert all(f["round"] == 3 for f in declined)
    assert rounds[3]["failed-replies"] == len(declined)
    summary = (out / "summary.md").read_text()
    assert "## Privacy" in summary and "sample level" in summary and "privacy budget spent" in summary
    assert (out / "privacy_utility.png").stat().st_size > 0


def test_central_dp_uses_flowers_accountant_and_stops_at_the_budget(base_settings, tmp_path):
    from fedmm.privacy import gaussian_epsilon

    ensure_base_checkpoint(base_settings, progress=False)
    sigma, delta = 2.0, 1e-5
    out = tmp_path / "report"
    run_config = {**base_settings.to_run_config(), "num-server-rounds": 3, "local-steps": 4, "output-dir": str(out),
                  "dp": "central-server", "dp-noise-multiplier": sigma, "dp-clip-norm": 0.5,
                  "max-epsilon": gaussian_epsilon(sigma, 2, delta) + 1e-6}
    code = run_simulation(ROOT, run_config, num_supernodes=4, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False, timeout=900)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = {int(k): v for k, v in metrics["rounds"].items()}
    assert sorted(rounds) == [0, 1, 2]  # the budget allows two of the three rounds
    for r in (1, 2):
        assert rounds[r]["privacy/epsilon"] == pytest.approx(gaussian_epsilon(sigma, r, delta), rel=5e-3)
        assert rounds[r]["train/num-replies"] == 4
    assert any("allows 2 of 3 rounds" in n for n in metrics["extra"]["privacy"]["notes"])
