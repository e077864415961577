"""Round time of one job in simulation, in the deployment engine, and in the compose rehearsal.

    .venv/bin/python benchmarks/deployment.py [--rounds 3] [--clients 10]
        [--engines simulation,deployment,stock,compose,simulation-3] [--run-config "k=v ..."]

simulation    Flower's simulation engine (`fedmm run`), --clients virtual clients
deployment    `fedmm run --deployment`: SuperLink + --clients SuperNodes on 127.0.0.1,
              TLS and node auth on, warm ClientApp workers (fedmm supernode)
stock         the same with Flower's stock SuperNodes: a fresh ClientApp process per message
compose       docker-compose.yml's job (3 SuperNodes; needs the local Docker engine up:
              ../shared/tools/local-docker.sh up)
simulation-3  simulation with 3 clients, the baseline of the compose row

Round 1 includes warm-up (model and data built on first use), so the table
gives it apart and the median of the later rounds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs import load_report, run_job  # noqa: E402


def deployment_job(name: str, overrides: dict, clients: int, work: Path, warm: bool) -> tuple[dict, float]:
    from fedmm.cli import format_run_config
    from fedmm.deploy.local import LocalFederation

    out = work / name
    start = time.perf_counter()
    with LocalFederation(out / "federation", clients, warm_clientapps=warm) as fed:
        code = fed.run(ROOT, format_run_config({**overrides, "output-dir": str(out / "report")}), stream=False)
    if code != 0:
        raise SystemExit(f"{name}: job failed ({code}); logs under {out}")
    return load_report(out / "report" / "metrics.json"), time.perf_counter() - start


def compose_job(overrides: dict, work: Path) -> tuple[dict, float]:
    from fedmm.cli import format_run_config

    env = dict(os.environ)
    env.update(FEDMM_CREDENTIALS=str(work / "compose-credentials"), FEDMM_RUNS=str(work / "compose-runs"),
               FEDMM_RUN_CONFIG=format_run_config(overrides))
    compose = ["docker", "compose", "-p", "fedmm-bench", "-f", str(ROOT / "docker-compose.yml")]
    start = time.perf_counter()
    try:
        subprocess.run([*compose, "build"], env=env, cwd=ROOT, check=True, capture_output=True)
        start = time.perf_counter()  # the image build is not part of the job
        subprocess.run([*compose, "run", "--rm", "job"], env=env, cwd=ROOT, check=True, capture_output=True)
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, cwd=ROOT, capture_output=True)
    (report,) = (work / "compose-runs").glob("compose-*/metrics.json")
    return load_report(report), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--engines", default="simulation,deployment,stock,compose,simulation-3")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()

    from fedmm.cli import parse_run_config
    from fedmm.config import Settings
    from fedmm.pretrain import ensure_base_checkpoint

    overrides = {**parse_run_config(args.run_config), "num-server-rounds": args.rounds}
    settings = Settings.from_run_config(overrides)
    if settings.pretrained == "public-pretrain":
        ensure_base_checkpoint(settings)  # not part of any timed job
    work = Path(tempfile.mkdtemp(prefix="fedmm-bench-deploy-"))
    rows = []
    for engine in args.engines.split(","):
        clients = 3 if engine in ("compose", "simulation-3") else args.clients
        if engine.startswith("simulation"):
            report, wall = run_job(engine, {**overrides, "min-nodes": clients}, clients, work)
        elif engine in ("deployment", "stock"):
            report, wall = deployment_job(engine, {**overrides, "min-nodes": clients}, clients, work, engine == "deployment")
        elif engine == "compose":
            report, wall = compose_job(overrides, work)
        else:
            raise SystemExit(f"unknown engine {engine!r}")
        times = [report["rounds"][r]["round-seconds"] for r in range(1, args.rounds + 1)]
        later = statistics.median(times[1:]) if len(times) > 1 else times[0]
        rows.append((engine, clients, times[0], later, wall, report["rounds"][args.rounds]["central/zs-acc"]))
        print(f"{engine}: rounds {', '.join(f'{t:.1f}' for t in times)} s; wall {wall:.0f} s", flush=True)
    print("\n| engine | clients | round 1 (s) | median round 2+ (s) | job wall (s) | final zs-acc |")
    print("|---|---|---|---|---|---|")
    for engine, clients, first, later, wall, acc in rows:
        print(f"| {engine} | {clients} | {first:.1f} | {later:.1f} | {wall:.0f} | {acc:.2%} |")
    print(f"\nresults: {work}")
    print(json.dumps({r[0]: {"round1": r[2], "median": r[3]} for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
