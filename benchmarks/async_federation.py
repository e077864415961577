"""Asynchronous buffered aggregation (FedBuff) vs synchronous FedAvg when some clients are much slower.

    .venv/bin/python benchmarks/async_federation.py [--clients 10] [--slow 3] [--delay 40] [--rounds 8]
        [--deadline 15] [--buffer-size 5] [--aggregations 0] [--dc 0.5] [--run-config "k=v ..."]

One deployment-engine federation on 127.0.0.1 (``LocalFederation``: SuperLink,
``--clients`` SuperNodes with warm ClientApp workers, one task slot and one
torch thread each, so a waiting client holds no one else up), four jobs side
by side after an untimed warm-up job: ``--slow`` of the clients are a slow
tier whose training replies come ``--delay`` s later (a real wait in wall
time, which takes no CPU from the others, as a slow device's own compute
would not), on the run's non-IID partitions.

- sync, wait for all: FedAvg, every round waits for its slowest client;
- sync, deadline: FedAvg with ``round-timeout`` = ``--deadline``: the slow
  tier's replies miss every round (their data never reaches the model);
- FedBuff: ``concurrency`` = every client, ``buffer-size`` updates per
  aggregation, staleness (tau+1)^-0.5, without and with delay compensation.

The clock of a job is the sum of its ``round-seconds`` (the wall time between
two aggregations, the server's own evaluation and checkpoint included; start-up
excluded, the same for every job). The target is 95% of the wait-for-all run's
final central zero-shot accuracy; the table gives each job's time to first
reach it, its final accuracy, and the staleness of what it applied.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import accumulate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs import load_report, prepare  # noqa: E402  (this folder is on sys.path when a benchmark runs)

ROOT = Path(__file__).resolve().parents[1]


def rows(args: argparse.Namespace) -> list[tuple[str, dict]]:
    tiers = {"client-profiles": f"slow: delay={args.delay:g}; fast:",
             "partition-profiles": ",".join(["slow"] * args.slow + ["fast"] * (args.clients - args.slow))}
    fedbuff = {**tiers, "asynchronous": True, "buffer-size": args.buffer_size, "staleness": "polynomial a=0.5",
               "num-server-rounds": args.aggregations}
    return [
        ("sync, wait for all", {**tiers, "round-timeout": 600.0}),
        (f"sync, deadline {args.deadline:g} s", {**tiers, "round-timeout": args.deadline}),
        ("FedBuff", fedbuff),
        (f"FedBuff + DC {args.dc:g}", {**fedbuff, "delay-compensation": args.dc}),
    ]


def clock(rounds: dict[int, dict]) -> list[tuple[float, float]]:
    """(seconds since the base was evaluated, central zs-acc) after each round or aggregation."""
    done = sorted(r for r in rounds if r > 0)
    times = accumulate(rounds[r]["round-seconds"] for r in done)
    return [(t, rounds[r]["central/zs-acc"]) for t, r in zip(times, done)]


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--slow", type=int, default=3, help="clients in the slow tier")
    parser.add_argument("--delay", type=float, default=40.0, help="seconds the slow tier's replies come later")
    parser.add_argument("--rounds", type=int, default=8, help="synchronous rounds")
    parser.add_argument("--deadline", type=float, default=15.0, help="the deadline job's round-timeout (s)")
    parser.add_argument("--buffer-size", type=int, default=5)
    parser.add_argument("--aggregations", type=int, default=0,
                        help="FedBuff's aggregations (0: as many updates as the synchronous runs apply)")
    parser.add_argument("--dc", type=float, default=0.5, help="delay compensation's lambda")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    args.aggregations = args.aggregations or args.rounds * args.clients // args.buffer_size

    from fedmm.config.text import format_run_config
    from fedmm.config import Settings
    from fedmm.deploy.local import LocalFederation

    base, settings, work = prepare(args.run_config, args.rounds, "async")
    base["min-nodes"] = args.clients
    jobs = rows(args)
    for _, overrides in jobs:
        Settings.from_run_config({**base, **overrides})  # a bad row fails before any job runs
    results = []
    with LocalFederation(work / "federation", args.clients, core_slots=args.clients, threads=1) as fed:
        def run(name: str, overrides: dict) -> tuple[dict, float]:
            out = work / "".join(c if c.isalnum() else "_" for c in name)
            start = time.perf_counter()
            code = fed.run(ROOT, format_run_config({**base, **overrides, "output-dir": str(out)}), stream=False,
                           timeout=3600)
            if code != 0:
                raise SystemExit(f"{name}: job failed ({code}); logs under {fed.home / 'logs'}")
            return load_report(out / "metrics.json"), time.perf_counter() - start

        run("warm-up", {"num-server-rounds": 1})  # every worker's imports and first build, before any clock
        for name, overrides in jobs:
            report, wall = run(name, overrides)
            curve = clock(report["rounds"])
            train = [c for c in report["clients"] if c["phase"] == "train"]
            slow_share = sum(c["partition-id"] < args.slow for c in train) / max(1, len(train))
            taus = [c["staleness"] for c in train if "staleness" in c]
            results.append((name, curve, slow_share, taus))
            print(f"{name}: final zs-acc {curve[-1][1]:.4f} after {curve[-1][0]:.0f} s "
                  f"({len(curve)} rounds/aggregations; job {wall:.0f} s)", flush=True)

    target = 0.95 * results[0][1][-1][1]
    reference = time_to(results[0][1], target)
    print(f"\n### FedBuff vs synchronous FedAvg ({args.clients} clients, {args.slow} of them {args.delay:g} s "
          f"slower; target {target:.2%} = 95% of wait-for-all's final)\n")
    print("| job | rounds / aggregations | time to target (s) | speed-up vs wait-for-all | final zs-acc | "
          "clock at the end (s) | slow tier's share of applied updates | staleness median / max |")
    print("|---|---|---|---|---|---|---|---|")
    for name, curve, slow_share, taus in results:
        reached = time_to(curve, target)
        speedup = f"{reference / reached:.2f}x" if reached and reference else "-"
        stale = f"{statistics.median(taus):.0f} / {max(taus)}" if taus else "-"
        print(f"| {name} | {len(curve)} | {reached:.0f} | {speedup} | {curve[-1][1]:.2%} | {curve[-1][0]:.0f} | "
              f"{slow_share:.0%} | {stale} |" if reached else
              f"| {name} | {len(curve)} | not reached | - | {curve[-1][1]:.2%} | {curve[-1][0]:.0f} | "
              f"{slow_share:.0%} | {stale} |")
    print(f"\nReports (staleness.png for the FedBuff jobs) under {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
