"""Experiments: a base run config, a grid of overrides and a list of seeds, each run an ordinary ``fedmm run``.

    fedmm experiment FILE.toml [--out DIR]

The file::

    [experiment]
    name = "strategies"          # the folder under runs/ unless --out names one
    clients = 10                 # fedmm run --clients
    seeds = [0, 1, 2]
    parallel = 1                 # runs at once (each is a whole simulation; 1 on a 2-core machine)
    target = 0.8                 # optional: rounds to reach this central zero-shot accuracy
    deployment = false           # true: each run on the deployment engine (fedmm run --deployment)

    [base]                       # run-config keys every run shares
    model = "fedmm-tiny-vit"
    num-server-rounds = 10

    [grid]                       # every combination of these values is a grid point
    strategy = ["fedavg", "fedprox"]

    [[points]]                   # or (and) named points, each its own overrides
    label = "fedprox-mu1"
    strategy = "fedprox"
    proximal-mu = 1.0

Every point's run config is checked (with each seed) before the first run
starts: a bad key fails naming the key and the point. Each run has a
folder ``<out>/runs/<point>/seed-<s>/`` with ``run.json`` (the exact
command, the resolved run config, ``status``: started, finished, failed or
interrupted) and its report in ``report/`` (TensorBoard's events in
``report/tensorboard``: ``tensorboard --logdir <out>/runs`` shows the runs
side by side, named by point and seed). Running the same command again
continues an interrupted experiment: finished runs are kept, any other is
run again from the start; a finished run the file would now run differently
(its base, point or seeds' config, clients or engine edited since) stops the
experiment before any run starts, naming the run and what changed. Then
fedmm/experiment_report.py writes the comparison table and plots into
``<out>`` (also when the experiment is stopped: the finished runs' table,
saying how many of all they are).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, Settings
from .config.text import format_run_config
from .deploy.processes import Interrupted

RUN_FILE = "run.json"
FINISHED = "finished"
_UNSET = object()


@dataclass(frozen=True)
class Point:
    label: str
    overrides: dict[str, Any]


@dataclass
class Experiment:
    name: str
    base: dict[str, Any]
    points: list[Point]
    seeds: list[int]
    clients: int = 10
    parallel: int = 1
    target: float | None = None
    deployment: bool = False
    source: Path = field(default_factory=Path)

    def runs(self) -> list[tuple[Point, int]]:
        return [(point, seed) for point in self.points for seed in self.seeds]

    def run_config(self, point: Point, seed: int, report: Path) -> dict[str, Any]:
        return {**self.base, **point.overrides, "seed": seed, "output-dir": str(report)}


_NOT_IN_LABEL = re.compile(r"[^A-Za-z0-9_.=+-]")  # what a run folder's name may not hold


def _label(overrides: dict[str, Any]) -> str:
    text = "-".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return _NOT_IN_LABEL.sub("_", text)


def load_experiment(path: Path) -> Experiment:
    """Parse and check an experiment file: every point with every seed is a valid run config (ConfigError names the
    file, the point and the key)."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"experiment {path}: {exc}") from exc
    unknown = sorted(set(raw) - {"experiment", "base", "grid", "points"})
    if unknown:
        raise ConfigError(f"experiment {path}: unknown table(s) {unknown}; expected experiment, base, grid, points")
    head = dict(raw.get("experiment", {}))
    known = {"name", "clients", "seeds", "parallel", "target", "deployment"}
    if set(head) - known:
        raise ConfigError(f"experiment {path}: [experiment] has unknown key(s) {sorted(set(head) - known)}; "
                          f"expected {sorted(known)}")
    seeds = head.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"experiment {path}: [experiment] seeds = {seeds!r}: a non-empty list of distinct integers")
    for key, low in (("clients", 1), ("parallel", 1)):
        value = head.get(key, 10 if key == "clients" else 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ConfigError(f"experiment {path}: [experiment] {key} = {value!r}: an integer >= {low}")
    target = head.get("target")
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ConfigError(f"experiment {path}: [experiment] target = {target!r}: an accuracy in (0, 1]")
    grid = dict(raw.get("grid", {}))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"experiment {path}: [grid] {key} = {values!r}: a non-empty list of values")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    named = []
    for i, spec in enumerate(raw.get("points", [])):
        spec = dict(spec)
        label = spec.pop("label", None)
        # a label names a folder under runs/ that a rerun deletes when unfinished: one plain folder name, never a path
        if label is not None and not (isinstance(label, str) and label.strip(".") and not _NOT_IN_LABEL.search(label)):
            raise ConfigError(f"experiment {path}: [[points]] #{i + 1} label {label!r}: letters, digits and "
                              f"_ . = + - only, not all dots (it names the run's folder under runs/)")
        named.append((label or None, spec, i))
    points: list[Point] = []
    for combo in combos:
        for label, spec, _ in named or [(None, {}, 0)]:
            parts = [_label(combo)] if combo else []
            parts += [label or _label(spec)] if named else []
            points.append(Point("-".join(parts) or "base", {**combo, **spec}))
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"experiment {path}: two points share a label ({labels}); give [[points]] distinct labels")
    exp = Experiment(str(head.get("name", path.stem)), dict(raw.get("base", {})), points, list(seeds),
                     int(head.get("clients", 10)), int(head.get("parallel", 1)),
                     float(target) if target is not None else None, bool(head.get("deployment", False)), path)
    for point, seed in exp.runs():
        try:
            Settings.from_run_config(exp.run_config(point, seed, Path("report")))
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"experiment {path}: point '{point.label}' (seed {seed}): {exc}") from exc
    return exp


def run_folder(out: Path, point: Point, seed: int) -> Path:
    return out / "runs" / point.label / f"seed-{seed}"


def _record(folder: Path) -> dict[str, Any] | None:
    """A run's run.json (None: none, or not a JSON object)."""
    try:
        record = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_rounds(report: Path) -> dict[int, dict[str, float]]:
    """A report's metrics.json as {round: {metric: number}}, numbers only, whoever wrote the file; ValueError
    naming the file when it is not a fedmm report's metrics."""
    path = report / "metrics.json"
    try:
        rounds = json.loads(path.read_text())["rounds"]
        read = {int(rnd): {key: float(value) for key, value in row.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)}
                for rnd, row in rounds.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a fedmm report's metrics ({exc!r})") from exc
    if not read:
        raise ValueError(f"{path}: no rounds")
    return read


def finished_run(folder: Path) -> tuple[dict[str, Any], dict[int, dict[str, float]]] | None:
    """A finished run's run.json and its report's rounds, each read once (None: not finished, or its report
    unreadable)."""
    record = _record(folder)
    if record is None or record.get("status") != FINISHED:
        return None
    try:
        return record, read_rounds(folder / "report")
    except ValueError:
        return None


def run_status(folder: Path) -> str | None:
    """A run's status from its run.json (None: never started); finished only with a readable report."""
    record = _record(folder)
    if record is None:
        return None
    if record.get("status") == FINISHED:
        try:
            read_rounds(folder / "report")
        except ValueError:
            return "incomplete"
    return str(record.get("status"))


def changed_runs(exp: Experiment, out: Path) -> list[str]:
    """Finished runs in ``out`` that the experiment would now run differently (its file edited since): each
    'folder: what changed'. Keeping them would put one configuration's results under another's label."""
    changed = []
    for point, seed in exp.runs():
        folder = run_folder(out, point, seed)
        found = finished_run(folder)
        if found is None:
            continue
        record = found[0]
        recorded = record.get("run-config")
        then = {k: v for k, v in recorded.items() if k != "output-dir"} if isinstance(recorded, dict) else {}
        now = {k: v for k, v in exp.run_config(point, seed, folder).items() if k != "output-dir"}
        diffs = [f"'{k}' was {then.get(k, '(unset)')!r}, now {now.get(k, '(unset)')!r}"
                 for k in sorted(then.keys() | now.keys()) if then.get(k, _UNSET) != now.get(k, _UNSET)]
        try:
            args = shlex.split(str(record.get("command", "")))
        except ValueError:
            args = []
        clients = args[args.index("--clients") + 1] if "--clients" in args[:-1] else "(unknown)"
        if clients != str(exp.clients):
            diffs.append(f"clients was {clients}, now {exp.clients}")
        if ("--deployment" in args) != exp.deployment:
            diffs.append(f"deployment was {'--deployment' in args}, now {exp.deployment}")
        if diffs:
            changed.append(f"{folder}: " + "; ".join(diffs))
    return changed


def command(exp: Experiment, config: dict[str, Any]) -> list[str]:
    """The exact ``fedmm run`` of one run."""
    args = ["fedmm", "run", "--clients", str(exp.clients), "--run-config", format_run_config(config)]
    return args + (["--deployment"] if exp.deployment else [])


def run_experiment(exp: Experiment, out: Path, log=print) -> list[Path]:
    """Every run not yet finished, ``exp.parallel`` at a time; the finished runs' folders. A failed run is recorded
    and the others go on; an interruption stops the runs in flight and marks them interrupted."""
    changed = changed_runs(exp, out)
    if changed:  # before any run starts: nothing is overwritten or mixed
        raise ConfigError(f"experiment {exp.source}: {len(changed)} finished run(s) in {out} were run with another "
                          f"configuration than the file now gives: " + " | ".join(changed) + ". Give --out another "
                          "folder, or delete those runs' folders to run them again")
    out.mkdir(parents=True, exist_ok=True)
    if exp.source.is_file():  # the file this experiment ran from, beside its runs
        (out / "experiment.toml").write_text(exp.source.read_text())
    pending = []
    for point, seed in exp.runs():
        folder = run_folder(out, point, seed)
        status = run_status(folder)
        if status == FINISHED:
            continue
        if folder.exists():  # started before and not finished: run again from the start
            log(f"fedmm experiment: {point.label} seed {seed}: {status or 'no readable run.json'}; run again")
            shutil.rmtree(folder)
        pending.append((point, seed, folder))
    total = len(exp.runs())
    log(f"fedmm experiment {exp.name}: {total} runs ({len(exp.points)} points x {len(exp.seeds)} seeds), "
        f"{total - len(pending)} already finished; folder {out}")
    running: list[tuple[subprocess.Popen, Path, dict[str, Any], float]] = []
    try:
        while pending or running:
            while pending and len(running) < exp.parallel:
                point, seed, folder = pending.pop(0)
                running.append(_start(exp, point, seed, folder, log))
            time.sleep(0.5)
            for item in list(running):
                proc, folder, record, started = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                record.update(status=FINISHED if proc.returncode == 0 else "failed", returncode=proc.returncode,
                              wall_seconds=time.perf_counter() - started)
                _write(folder, record)
                log(f"fedmm experiment: {record['point']} seed {record['seed']}: {record['status']} in "
                    f"{record['wall_seconds']:.0f} s (log {folder / 'run.log'})")
    except (KeyboardInterrupt, Interrupted):
        for proc, folder, record, _ in running:
            # fedmm run stops every process it started on its first signal (a Ctrl-C reaches it already; a SIGTERM
            # to this process alone does not) and ignores later ones
            proc.send_signal(signal.SIGINT)
            proc.wait()
            record["status"] = "interrupted"
            _write(folder, record)
        raise
    return [run_folder(out, p, s) for p, s in exp.runs() if run_status(run_folder(out, p, s)) == FINISHED]


def _start(exp: Experiment, point: Point, seed: int, folder: Path,
           log) -> tuple[subprocess.Popen, Path, dict[str, Any], float]:
    folder.mkdir(parents=True)
    config = exp.run_config(point, seed, folder / "report")
    cmd = command(exp, config)
    record = {"point": point.label, "seed": seed, "overrides": point.overrides, "run-config": config,
              "command": " ".join(_quote(c) for c in cmd), "status": "started"}
    _write(folder, record)
    log(f"fedmm experiment: {point.label} seed {seed}: {record['command']}")
    with open(folder / "run.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedmm.cli", *cmd[1:]], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, folder, record, time.perf_counter()


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_./=-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _write(folder: Path, record: dict[str, Any]) -> None:
    tmp = folder / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(folder / RUN_FILE)
