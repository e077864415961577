"""One fedmm job in Flower's simulation engine, for the benchmarks that compare run configs."""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(name: str, overrides: dict, clients: int, work: Path) -> tuple[dict, float]:
    """Run the app with ``overrides`` into ``work/name``; its metrics.json (rounds keyed by int) and wall seconds."""
    from fedmm.cli import run_simulation

    out = work / name
    start = time.perf_counter()
    code = run_simulation(ROOT, {**overrides, "output-dir": str(out / "report")}, num_supernodes=clients,
                          flwr_home=out / "flwr", stream=False)
    if code != 0:
        raise SystemExit(f"{name}: job failed ({code}); logs under {out}")
    return load_report(out / "report" / "metrics.json"), time.perf_counter() - start


def load_report(path: Path) -> dict:
    data = json.loads(path.read_text())
    data["rounds"] = {int(k): v for k, v in data["rounds"].items()}
    return data
