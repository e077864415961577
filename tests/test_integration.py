"""A real federation in Flower's simulation engine (SuperLink + Ray on 127.0.0.1)."""

import json
from pathlib import Path

import pytest

from conftest import ONE_ACTOR
from fedmm import lora
from fedmm.deploy.simulation import SimulationSuperLink, run_simulation
from fedmm.pretrain import ensure_base_checkpoint, load_base_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_simulation_improves_accuracy_and_writes_report(base_settings, tmp_path):
    """A whole tiny federation: it learns, writes every report file, exports a peft adapter, leaves no process.

    Each built-in family runs ≥2 rounds in some simulation test: the robust family here (Bulyan: Krum
    selection, then a trimmed mean); FedAvg in tests/test_default_model_federation.py; FedProx, with its client
    obligation, in tests/test_faults.py; the adaptive optimisers (FedAdam) in tests/test_resume.py; QFedAvg in
    tests/test_qfedavg_federation.py.
    """
    ensure_base_checkpoint(base_settings, progress=False)  # shared with the other tests
    out = tmp_path / "report"
    home = tmp_path / "flwr-home"
    run_config = {
        **base_settings.to_run_config(),
        "num-server-rounds": 3,
        "local-steps": 12,
        "partitioner": "iid",
        "strategy": "bulyan",
        "strategy-args": "num_malicious_nodes=0",
        "output-dir": str(out),
    }
    code = run_simulation(ROOT, run_config, num_supernodes=4, flwr_home=home, stream=True, timeout=900)
    assert code == 0
    # Nothing the federation started is still running.
    link = SimulationSuperLink(home, home / "superlink.log")
    assert link.processes() == []

    metrics = json.loads((out / "metrics.json").read_text())
    rounds = {int(k): v for k, v in metrics["rounds"].items()}
    assert sorted(rounds) == [0, 1, 2, 3]
    base_acc, final_acc = rounds[0]["central/zs-acc"], rounds[3]["central/zs-acc"]
    assert final_acc > base_acc + 0.02, (base_acc, final_acc)
    assert rounds[3]["evaluate/num-replies"] == 4 and rounds[3]["train/num-replies"] == 4
    assert all(rounds[r].get("dropped-updates", 0) == 0 for r in (1, 2, 3))
    assert rounds[3]["round-seconds"] > 0
    clients = [c for c in metrics["clients"] if c["phase"] == "train" and c["round"] == 1]
    assert sorted(c["partition-id"] for c in clients) == [0, 1, 2, 3]
    for name in ("metrics.csv", "clients.csv", "accuracy.png", "loss.png", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert "| zs-acc |" in (out / "summary.md").read_text()
    # fairness and toxicity are measured in every run, constrained or not
    final = rounds[3]
    assert final["central/acc-gap"] == pytest.approx(abs(final["central/zs-acc-group-0"] - final["central/zs-acc-group-1"]))
    assert 0 <= final["central/toxic-top1"] <= 1 and 0 <= final["evaluate/toxic-top1"] <= 1
    assert final["evaluate/client-acc-min"] <= final["evaluate/zs-acc"]
    assert not any(k.startswith("constraints/") for k in final)
    # The exported adapter loads with peft onto a fresh base.
    loaded = lora.load_peft(load_base_model(base_settings, progress=False), out / "adapter")
    assert all(k.split(".")[-2] in ("lora_A", "lora_B") for k in lora.adapter_state(loaded))
    assert metrics["extra"]["adapter-bytes"] < 0.05 * metrics["extra"]["base-model-bytes"]


def test_constrained_federation_over_compressed_links(base_settings, tmp_path):
    """Constraints (dual ascent) and codecs (top-k + q4 up, q8 down) are wrappers and mods: they compose."""
    from fedmm.constraints import dual_ascent

    ensure_base_checkpoint(base_settings, progress=False)
    out = tmp_path / "report"
    steps = {"group-gap": 20.0, "toxicity": 50.0}
    thresholds = {"group-gap": 0.05, "toxicity": 0.01}
    run_config = {
        **base_settings.to_run_config(),
        "num-server-rounds": 3,
        "local-steps": 6,
        "group-sites": 0.5,
        "constraints": "group-gap,toxicity",
        "dual-step-group-gap": steps["group-gap"],
        "dual-step-toxicity": steps["toxicity"],
        "codec": "topk0.1+q4",
        "codec-downlink": "q8",
        "output-dir": str(out),
    }
    code = run_simulation(ROOT, run_config, num_supernodes=4, cpus_per_client=ONE_ACTOR,
                          flwr_home=tmp_path / "flwr", stream=False, timeout=900)
    assert code == 0, (tmp_path / "flwr" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = {int(k): v for k, v in metrics["rounds"].items()}
    # constraints: each round's multiplier is one projected step from the previous round's measurement
    assert rounds[1]["train/num-replies"] == 4  # no round skipped for inconsistent metric keys
    for name in steps:
        assert rounds[1][f"constraints/multiplier-{name}"] == 0.0
        for r in (1, 2):
            measured = rounds[r][f"constraints/{name}"]
            expected = dual_ascent(rounds[r][f"constraints/multiplier-{name}"], measured, thresholds[name], steps[name])
            assert rounds[r + 1][f"constraints/multiplier-{name}"] == pytest.approx(expected)
    # ~10% of the captions are toxic and the contrastive loss pulls them to their images: the constraint
    # starts violated
    assert rounds[1]["constraints/toxicity"] > thresholds["toxicity"] and rounds[2]["constraints/multiplier-toxicity"] > 0
    summary = (out / "summary.md").read_text()
    assert "## Fairness and toxicity" in summary and "constraints/multiplier-toxicity" in summary
    assert "| group | server examples |" in summary and (out / "fairness.png").stat().st_size > 0
    # codecs: wire bytes really drop, both ways (what Flower counted on each reply), and nothing is dropped
    fp32 = metrics["extra"]["adapter-bytes"]
    for r in (1, 2, 3):
        assert rounds[r]["train/num-replies"] == 4 and rounds[r].get("dropped-updates", 0) == 0
        assert rounds[r]["train/bytes-uplink-per-client"] < 0.1 * fp32
        assert rounds[r]["train/bytes-uplink-total"] == 4 * rounds[r]["train/bytes-uplink-per-client"]
        assert rounds[r]["bytes/downlink-per-client"] < 0.3 * fp32
    # the updates arrive, decoded: round 1 learns (measured 0.379 -> 0.402; an update decoded to zeros leaves the
    # base's 0.379, garbage ruins it), and the constrained rounds after it stay near it (0.394, 0.383)
    base = rounds[0]["central/zs-acc"]
    assert rounds[1]["central/zs-acc"] > base + 0.01, [rounds[r]["central/zs-acc"] for r in range(4)]
    assert min(rounds[r]["central/zs-acc"] for r in (1, 2, 3)) > base - 0.01
    assert (out / "bytes.png").stat().st_size > 0


def test_fedmm_run_fails_when_the_server_app_fails(tmp_path, monkeypatch, capsys):
    """`flwr run --stream` exits 0 even if the ServerApp raised; `fedmm run` must not."""
    from fedmm import cli

    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\nmissing.png,nothing here\n")  # no usable row
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "unused"))
    code = cli.main([
        "run", "--clients", "2",
        "--run-config", f"model='fedmm-tiny-vit' dataset='{manifest}' pretrained='none' output-dir='{tmp_path / 'out'}'",
    ])
    assert code == 1
    assert "the run did not complete" in capsys.readouterr().err
