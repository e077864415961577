"""Round time of one job in simulation, in the deployment engine, and in the compose rehearsal.

    .venv/bin/python benchmarks/deployment.py [--rounds 3] [--clients 10]
        [--engines simulation,deployment,stock,compose,simulation-3] [--run-config "k=v ..."] [--sites]

simulation    Flower's simulation engine (`fedmm run`), --clients virtual clients
deployment    `fedmm run --deployment`: SuperLink + --clients SuperNodes on 127.0.0.1,
              TLS and node auth on, warm ClientApp workers (fedmm supernode)
stock         the same with Flower's stock SuperNodes: a fresh ClientApp process per message
compose       docker-compose.yml's job (3 SuperNodes; needs the local Docker engine up:
              ../shared/tools/local-docker.sh up)
simulation-3  simulation with 3 clients, the baseline of the compose row
simulation-sites  (with --sites) simulation on the same site files: one manifest
              over the exported folders, a site per natural partition

--sites: the deployment engines' SuperNodes train on site-local data, each on its
own folder (`fedmm data export` of the run's partitions: PNG files decoded and
transformed per batch), with the run's label and group names in the run config;
the simulation row slices the bundled data in memory, as a researcher runs it,
and simulation-sites runs the deployment's job (its server split and public
pairs from the exported files too) in simulation, decoding the same files per
batch as the sites do.

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


def site_folders(overrides: dict, clients: int, work: Path) -> tuple[dict, list[Path]]:
    """The run's partitions exported as one folder per site; the run config that names their label space."""
    from fedmm.config import Settings
    from fedmm.config.data import inline_name_file
    from fedmm.data.sites import MANIFEST, export_sites

    export_sites(Settings.from_run_config(overrides), work / "sites", clients)
    names = {k: inline_name_file(f"@{work / 'sites' / 'run' / f'{k}.txt'}", k) for k in ("classes", "groups")}
    # the simulation's view of the same files: one manifest, site i the natural partition i (ids sort as sites)
    lines = []
    folders = [(f"site-{i}", "clients", f"{i:05d}") for i in range(clients)] + [("server", "server", ""), ("public", "public", "")]
    for folder, split, client in folders:
        for line in (work / "sites" / folder / MANIFEST).read_text().splitlines():
            row = {**json.loads(line), "split": split, "client": client}
            row["image"] = f"{folder}/{row['image']}"
            lines.append(json.dumps(row))
    (work / "sites" / "all.jsonl").write_text("\n".join(lines) + "\n")
    return names, [work / "sites" / f"site-{i}" / MANIFEST for i in range(clients)]


def deployment_job(name: str, overrides: dict, clients: int, work: Path, warm: bool,
                   sites: list[Path] | None = None) -> tuple[dict, float]:
    from fedmm.config.text import format_run_config
    from fedmm.deploy.local import LocalFederation

    out = work / name
    start = time.perf_counter()
    with LocalFederation(out / "federation", clients, warm_clientapps=warm, sites=sites) as fed:
        code = fed.run(ROOT, format_run_config({**overrides, "output-dir": str(out / "report")}), stream=False)
    if code != 0:
        raise SystemExit(f"{name}: job failed ({code}); logs under {out}")
    return load_report(out / "report" / "metrics.json"), time.perf_counter() - start


def compose_job(overrides: dict, work: Path) -> tuple[dict, float]:
    from fedmm.config.text import format_run_config

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
    parser.add_argument("--sites", action="store_true", help="deployment SuperNodes read their own site folders")
    args = parser.parse_args()

    from fedmm.config.text import parse_run_config
    from fedmm.config import Settings
    from fedmm.pretrain import ensure_base_checkpoint

    overrides = {**parse_run_config(args.run_config), "num-server-rounds": args.rounds}
    settings = Settings.from_run_config(overrides)
    if settings.pretrained == "public-pretrain":
        ensure_base_checkpoint(settings)  # not part of any timed job
    work = Path(tempfile.mkdtemp(prefix="fedmm-bench-deploy-"))
    site_config, sites = site_folders(overrides, args.clients, work) if args.sites else ({}, None)
    # with --sites, the deployment and simulation-sites run one job: the server's split and the public pairs
    # (and so the base) from the files too; the bundled 'simulation' row keeps the in-memory data
    sites_run = {**site_config, "dataset": str(work / "sites" / "all.jsonl"), "partitioner": "natural"} if sites else {}
    if sites and settings.pretrained == "public-pretrain":
        ensure_base_checkpoint(Settings.from_run_config({**overrides, **sites_run}))  # not part of any timed job
    rows = []
    for engine in args.engines.split(","):
        clients = 3 if engine in ("compose", "simulation-3") else args.clients
        if engine == "simulation-sites":
            if not args.sites:
                raise SystemExit("simulation-sites needs --sites")
            report, wall = run_job(engine, {**overrides, **sites_run, "min-nodes": clients}, clients, work)
        elif engine.startswith("simulation"):
            report, wall = run_job(engine, {**overrides, "min-nodes": clients}, clients, work)
        elif engine in ("deployment", "stock"):
            report, wall = deployment_job(engine, {**overrides, **sites_run, "min-nodes": clients}, clients, work,
                                          engine == "deployment", sites)
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
