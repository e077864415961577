import csv
import json

from fedmm.config import Settings
from fedmm.report import write_report


def test_report_files_from_history(tmp_path):
    rounds = {
        0: {"central/zs-acc": 0.3, "central/zs-acc-group-0": 0.4, "central/loss": 2.0},
        1: {"central/zs-acc": 0.5, "central/zs-acc-group-0": 0.6, "central/loss": 1.5, "train/train-loss": 1.2,
            "evaluate/zs-acc": 0.45, "round-seconds": 3.0},
    }
    clients = [{"round": 1, "phase": "evaluate", "partition-id": 0, "num-examples": 10, "zs-acc": 0.4}]
    paths = write_report(tmp_path, settings=Settings.from_run_config({}), rounds=rounds, clients=clients)
    data = json.loads(paths["json"].read_text())
    assert data["rounds"]["1"]["central/zs-acc"] == 0.5 and data["config"]["lora-rank"] == 8
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["round"] for r in rows] == ["0", "1"] and rows[1]["central/zs-acc"] == "0.5"
    summary = paths["summary"].read_text()
    assert "| zs-acc | 0.3000 | 0.5000 |" in summary
    assert "| 0 | 10 | 0.4000 |" in summary
    for png in ("accuracy.png", "loss.png", "retrieval.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_the_report_shows_group_names(tmp_path):
    from fedmm.config import Settings
    from fedmm.report import write_report

    rounds = {0: {"central/zs-acc": 0.4, "central/zs-acc-group-0": 0.5, "central/zs-acc-group-1": 0.3},
              1: {"central/zs-acc": 0.6, "central/zs-acc-group-0": 0.7, "central/zs-acc-group-1": 0.5}}
    paths = write_report(tmp_path, settings=Settings.from_run_config({}), rounds=rounds, clients=[],
                         extra={"group-names": ["female", "male"]})
    summary = paths["summary"].read_text()
    assert "| female |" in summary and "| male |" in summary
