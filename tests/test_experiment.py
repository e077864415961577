"""Experiments (fedmm/experiment.py, fedmm/experiment_report.py) and the live TensorBoard view."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedmm.config import ConfigError
from fedmm.experiment import Point, load_experiment, run_folder, run_status
from fedmm.experiment_report import write_comparison

ROOT = Path(__file__).resolve().parents[1]


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_an_experiment_file_is_checked_before_any_run_naming_the_point_and_key(tmp_path):
    exp = load_experiment(_file(tmp_path, """
[experiment]
seeds = [0, 1]
[base]
model = "fedmm-tiny-vit"
[grid]
strategy = ["fedavg", "fedprox"]
lr = [0.001, 0.01]
[[points]]
label = "rank4"
lora-rank = 4
"""))
    assert [p.label for p in exp.points] == ["strategy=fedavg-lr=0.001-rank4", "strategy=fedavg-lr=0.01-rank4",
                                             "strategy=fedprox-lr=0.001-rank4", "strategy=fedprox-lr=0.01-rank4"]
    assert len(exp.runs()) == 8 and exp.points[0].overrides == {"strategy": "fedavg", "lr": 0.001, "lora-rank": 4}
    for text, named in [
        ('[experiment]\nseeds = [0]\n[grid]\nlr = ["fast"]\n', "point 'lr=fast' (seed 0)"),
        ('[experiment]\nseeds = [0]\n[base]\nnum-server-rounds = 0\n', "'num-server-rounds'"),
        ('[experiment]\nseeds = []\n', "seeds = []"),
        ('[experiment]\nseed = [1]\n', "unknown key(s) ['seed']"),
        ('[experiment]\ntarget = 3\n', "target = 3"),
        ('[grid]\nstrategy = "fedavg"\n', "[grid] strategy"),
        # a label is a folder under runs/ that a rerun may delete: never a path out of it
        ('[[points]]\nlabel = "../../elsewhere"\nlr = 0.01\n', "label '../../elsewhere'"),
        ('[[points]]\nlabel = ".."\nlr = 0.01\n', "label '..'"),
        ('[[points]]\nlabel = "a/b"\nlr = 0.01\n', "label 'a/b'"),
    ]:
        with pytest.raises(ConfigError, match=None) as err:
            load_experiment(_file(tmp_path, text))
        assert named in str(err.value) and "exp.toml" in str(err.value)


def _cell(table_md: str, point: str, column: str) -> str:
    """One cell of an experiment's table.md."""
    lines = table_md.splitlines()
    header = [c.strip() for c in next(r for r in lines if r.startswith("| point |")).strip("|").split("|")]
    row = [c.strip() for c in next(r for r in lines if r.startswith(f"| {point} |")).strip("|").split("|")]
    return row[header.index(column)]


def _fake_run(out: Path, point: Point, seed: int, accs: list[float], status: str = "finished") -> None:
    folder = run_folder(out, point, seed)
    (folder / "report").mkdir(parents=True)
    rounds = {str(r): {"central/zs-acc": a, "central/loss": 1 - a, "train/bytes-uplink-total": 100.0 * (r > 0),
                       "central/robust-acc-noise": a / 2, "central/consistency-cosine": 0.25 + seed / 100,
                       "round-seconds": 3.0 + r, "failed-replies": float(seed * (r > 0)), "missing-replies": 0.0}
              for r, a in enumerate(accs)}
    (folder / "report" / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    (folder / "run.json").write_text(json.dumps({"status": status, "wall_seconds": 10.0 + seed}))


def test_the_table_is_the_t_interval_of_the_runs_own_metrics_and_the_plots_are_drawn(tmp_path):
    exp = load_experiment(_file(tmp_path, '[experiment]\nseeds = [0, 1, 2]\ntarget = 0.5\n[grid]\nlr = [0.001, 0.01]\n'))
    out = tmp_path / "out"
    finals = {exp.points[0].label: [0.40, 0.55, 0.61], exp.points[1].label: [0.7, 0.7, 0.7]}
    for point in exp.points:
        for seed, final in enumerate(finals[point.label]):
            _fake_run(out, point, seed, [0.1, 0.45, final])
    _fake_run(out, Point("unrelated", {}), 0, [0.9])  # not a point of this experiment: ignored
    paths = write_comparison(exp, out)
    import pandas as pd

    table = pd.read_csv(paths["table-csv"]).set_index("point")
    values = np.array(finals[exp.points[0].label])
    low, high = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
    row = table.loc[exp.points[0].label]
    assert row["seeds"] == 3 and row["central/zs-acc"] == pytest.approx(values.mean())
    assert row["central/zs-acc ±95%"] == pytest.approx((high - low) / 2)
    assert table.loc[exp.points[1].label, "central/zs-acc ±95%"] == 0.0  # identical seeds: no spread
    # the audit is compared like accuracy: the server's split is the same held-out set for every run
    assert row["central/robust-acc-noise"] == pytest.approx(values.mean() / 2)
    assert row["central/consistency-cosine"] == pytest.approx(0.26)
    # rounds to the target 0.5: round 2 where the final reaches it, never (NaN) for the seed at 0.40
    runs = pd.read_csv(paths["runs"])
    first = runs[runs["point"] == exp.points[0].label].sort_values("seed")
    assert math.isnan(first["rounds-to-target"].iloc[0]) and list(first["rounds-to-target"].iloc[1:]) == [2.0, 2.0]
    # and the server's clock to it: rounds 1 and 2 took 4 s and 5 s (round 0, the base's evaluation, is not a round)
    assert math.isnan(first["seconds-to-target"].iloc[0]) and list(first["seconds-to-target"].iloc[1:]) == [9.0, 9.0]
    assert list(first["uplink-bytes"]) == [200.0] * 3
    assert list(first["failed-replies"]) == [0.0, 2.0, 4.0]  # seed s lost s replies in each of its 2 rounds
    # the mean to the target is over the 2 seeds that reached it, and the table says so
    assert row["rounds-to-target"] == 2.0 and row["rounds-to-target n"] == 2 and row["central/zs-acc n"] == 3
    assert _cell(paths["table"].read_text(), exp.points[0].label, "rounds-to-target") == "2 ± 0 (2 of 3)"
    assert "of 3" not in _cell(paths["table"].read_text(), exp.points[0].label, "central/zs-acc")
    assert "± " in paths["table"].read_text()
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"central-zs-acc.png", "central-loss.png", "accuracy-vs-uplink-bytes.png",
            "central-robust-acc-noise.png"} <= plots
    assert "accuracy-vs-epsilon.png" not in plots  # no run spent any
    assert "6 of 6 runs finished" in paths["table"].read_text()
    # an experiment stopped part way: the table is of its finished runs, and says how many of all they are
    (run_folder(out, exp.points[1], 2) / "run.json").write_text(json.dumps({"status": "interrupted"}))
    paths = write_comparison(exp, out)
    assert "5 of 6 runs finished" in paths["table"].read_text()
    assert pd.read_csv(paths["table-csv"]).set_index("point").loc[exp.points[1].label, "seeds"] == 2
    # a target no run reached reads as none of them, not as a value left out
    exp.target = 0.95
    text = write_comparison(exp, out)["table"].read_text()
    assert _cell(text, exp.points[0].label, "rounds-to-target") == "— (0 of 3)"


def _finished_as_recorded(exp, out: Path, clients: int = 10) -> None:
    """Every run of ``exp`` finished, its run.json as run_experiment writes it."""
    from fedmm.experiment import command

    for point, seed in exp.runs():
        _fake_run(out, point, seed, [0.1, 0.5])
        folder = run_folder(out, point, seed)
        config = exp.run_config(point, seed, folder / "report")
        cmd = command(exp, config)
        cmd[cmd.index("--clients") + 1] = str(clients)
        (folder / "run.json").write_text(json.dumps({"status": "finished", "run-config": config, "wall_seconds": 1.0,
                                                     "command": " ".join(cmd[:4]) + " 'x'"}))


def test_continuing_an_experiment_whose_file_changed_since_stops_before_any_run_naming_the_run_and_key(tmp_path):
    from fedmm.experiment import run_experiment

    text = '[experiment]\nseeds = [0, 1]\n[base]\nmodel = "fedmm-tiny-vit"\nlr = {lr}\n[grid]\nlocal-steps = [2]\n'
    out = tmp_path / "out"
    _finished_as_recorded(load_experiment(_file(tmp_path, text.format(lr=0.001))), out)
    same = load_experiment(_file(tmp_path, text.format(lr=0.001)))
    assert len(run_experiment(same, out, log=lambda line: None)) == 2  # nothing to run: both kept
    edited = load_experiment(_file(tmp_path, text.format(lr=0.01)))
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(ConfigError) as err:
        run_experiment(edited, out, log=lambda line: None)
    assert "local-steps=2/seed-0" in str(err.value) and "'lr' was 0.001, now 0.01" in str(err.value)
    assert sorted(str(p) for p in out.rglob("*")) == before  # nothing overwritten or deleted
    _finished_as_recorded(same, tmp_path / "other", clients=3)  # the same config on another federation size
    with pytest.raises(ConfigError, match="clients was 3, now 10"):
        run_experiment(same, tmp_path / "other", log=lambda line: None)


def test_a_report_anyone_could_have_written_is_read_as_numbers_or_not_as_a_finished_run(tmp_path):
    from fedmm.experiment import read_rounds

    exp = load_experiment(_file(tmp_path, '[experiment]\nseeds = [0, 1, 2]\ntarget = 0.5\n'))
    out = tmp_path / "out"
    point = exp.points[0]
    _fake_run(out, point, 0, [0.1, 0.6])
    _fake_run(out, point, 1, [0.1, 0.7])
    _fake_run(out, point, 2, [0.1, 0.8])
    seed1, seed2 = run_folder(out, point, 1), run_folder(out, point, 2)
    # seed 1: strings where numbers go, a non-numeric round-seconds, a run.json's wall time that is not a number
    metrics = json.loads((seed1 / "report" / "metrics.json").read_text())
    metrics["rounds"]["1"].update({"round-seconds": "slow", "central/loss": [1], "central/t2i-R@1": True})
    (seed1 / "report" / "metrics.json").write_text(json.dumps(metrics))
    (seed1 / "run.json").write_text(json.dumps({"status": "finished", "wall_seconds": "a while"}))
    assert read_rounds(seed1 / "report")[1] == {"central/zs-acc": 0.7, "train/bytes-uplink-total": 100.0,
                                                "central/robust-acc-noise": 0.35, "central/consistency-cosine": 0.26,
                                                "failed-replies": 1.0, "missing-replies": 0.0}
    # seed 2: a metrics.json that is not a report's: the run is not finished (it would run again)
    for text in ("[1, 2]", '{"rounds": {"x": {}}}', '{"rounds": {}}', "{not json"):
        (seed2 / "report" / "metrics.json").write_text(text)
        with pytest.raises(ValueError, match="metrics.json"):
            read_rounds(seed2 / "report")
        assert run_status(seed2) == "incomplete"
    (seed2 / "run.json").write_text("[]")
    assert run_status(seed2) is None
    import pandas as pd

    runs = pd.read_csv(write_comparison(exp, out)["runs"]).set_index("seed")
    assert list(runs.index) == [0, 1]  # seed 2 is not a finished run
    assert runs.loc[1, "central/zs-acc"] == 0.7 and math.isnan(runs.loc[1, "wall-seconds"])
    assert math.isnan(runs.loc[1, "seconds-to-target"]) and runs.loc[1, "rounds-to-target"] == 1.0


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.integration
def test_an_experiment_runs_is_interrupted_and_continues_and_tensorboard_reads_a_running_job(tmp_path, base_settings):
    """2 points x 2 seeds of the tiny model through `fedmm experiment`: stopped (SIGINT) after its first run,
    continued by the same command without repeating the finished run; TensorBoard's own reader reads a run's
    scalars while the run is still going; the table's interval is computed from the runs' metrics; one point's
    runs differ only by their seed."""
    from fedmm.pretrain import ensure_base_checkpoint

    ensure_base_checkpoint(base_settings, progress=False)  # the session's base, which every run loads
    exp_file = _file(tmp_path, f"""
[experiment]
name = "t"
clients = 2
seeds = [0, 1]
parallel = 2
[base]
model = "fedmm-tiny-vit"
cache-dir = "{base_settings.cache_dir}"
pretrain-steps = {base_settings.pretrain_steps}
num-server-rounds = 1
local-steps = 2
min-nodes = 2
device = "cpu"
[grid]
lr = [0.001, 0.003]
""")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fedmm.cli", "experiment", str(exp_file), "--out", str(out)]
    exp = load_experiment(exp_file)
    first = run_folder(out, exp.points[0], 0)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    live = None
    try:
        deadline = time.time() + 600
        while run_status(first) != "finished":
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
            board = first / "report" / "tensorboard"
            if live is None and run_status(first) == "started" and board.is_dir() and any(board.iterdir()):
                live = _events(board)  # the job is still running: round 0 is in, its round is not
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the experiment and the run it started
        output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-3000:]
    assert "Continue with: fedmm experiment" in output
    partial = (out / "table.md").read_text()  # the finished runs' table, written when the experiment stopped
    assert live is not None and "central/zs-acc" in live and live["central/zs-acc"][0][0] == 0
    finished_once = (first / "run.json").read_text()
    statuses = [run_status(run_folder(out, p, s)) for p, s in exp.runs()]
    kept = statuses.count("finished")  # the first, and the one beside it if it finished first (parallel = 2)
    assert statuses[0] == "finished" and kept <= 2
    assert f"{kept} of 4 runs finished" in partial
    assert set(statuses) <= {"finished", "interrupted", None}  # a run in flight is marked, never left 'started'

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{kept} already finished" in again.stdout
    assert (first / "run.json").read_text() == finished_once  # not repeated
    assert all(run_status(run_folder(out, p, s)) == "finished" for p, s in exp.runs())
    # the finished run's events hold every round; the table's interval is the runs' own
    assert [step for step, _ in _events(first / "report" / "tensorboard")["central/zs-acc"]] == [0, 1]
    import pandas as pd

    table = pd.read_csv(out / "table.csv").set_index("point")
    for point in exp.points:
        finals = []
        configs = []
        for seed in exp.seeds:
            folder = run_folder(out, point, seed)
            rounds = json.loads((folder / "report" / "metrics.json").read_text())["rounds"]
            finals.append(rounds["1"]["central/zs-acc"])
            record = json.loads((folder / "run.json").read_text())
            assert record["command"].startswith("fedmm run --clients 2 --run-config")
            configs.append({k: v for k, v in record["run-config"].items() if k not in ("seed", "output-dir")})
        assert configs[0] == configs[1]  # one point's runs differ only by seed
        mean = np.mean(finals)
        half = 0.0 if np.std(finals) == 0 else (lambda lo_hi: (lo_hi[1] - lo_hi[0]) / 2)(
            stats.t.interval(0.95, 1, loc=mean, scale=stats.sem(finals)))
        assert table.loc[point.label, "central/zs-acc"] == pytest.approx(mean)
        assert table.loc[point.label, "central/zs-acc ±95%"] == pytest.approx(half)
    assert (out / "plots" / "central-zs-acc.png").is_file() and "4 of 4 runs finished" in (out / "table.md").read_text()


def test_the_round_line_gives_the_elapsed_time_and_the_jobs_eta(monkeypatch):
    from server import recording

    recorder = recording.RoundRecorder.__new__(recording.RoundRecorder)
    recorder.num_rounds, recorder.done, recorder.started = 10, 2, 100.0  # resumed after round 2
    monkeypatch.setattr(recording.time, "perf_counter", lambda: 160.0)
    assert recorder._timing(5) == "elapsed 0:01:00, ETA 0:01:40"  # 3 rounds in 60 s here, 5 left
    assert recorder._timing(2) == "elapsed 0:01:00, ETA ?"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "benchmarks" / "experiments").glob("*.toml")))
def test_the_repositorys_experiment_files_are_valid(name):
    exp = load_experiment(ROOT / "benchmarks" / "experiments" / name)
    assert len(exp.seeds) == 3 and len(exp.points) >= 2
