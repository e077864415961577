"""Heterogeneous tiers vs homogeneous clients: accuracy, round time and work done.

    .venv/bin/python benchmarks/tiers.py [--clients 10] [--rounds 10] [--strategies fedavg,hetlora]
        [--run-config "k=v ..."]

Rows, each one job in Flower's simulation engine:

- homogeneous (server): every client trains the run's rank on every target
  layer, all its local steps, fp32 — the ideal federation.
- homogeneous (phone): every client is a phone (below).
- tiers: 40% phones (rank 2, the first half of the target layers, batch 8,
  half the local steps, a time budget, bf16, 20% dropout), 30% laptops
  (rank 4, batch 16), 30% servers (rank 8), once per strategy.

Prints a markdown table: final and best central zero-shot accuracy, median
round time, mean work fraction (steps done / planned), declined (dropped-out)
replies, and uplink bytes per round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs import prepare, run_job  # noqa: E402  (this folder is on sys.path when a benchmark runs)


def tier_rows(settings, clients: int, strategies: list[str], time_budget: float) -> list[tuple[str, dict]]:
    targets = settings.lora_target_list
    phone = (f"phone: lora-rank=2 lora-targets={','.join(targets[:max(1, len(targets) // 2)])} batch-size=8 "
             f"local-steps={max(1, settings.local_steps // 2)} time-budget={time_budget} precision=bf16 dropout=0.2")
    profiles = f"{phone}; laptop: lora-rank=4 batch-size=16; server: lora-rank=8"
    n_phone, n_laptop = round(0.4 * clients), round(0.3 * clients)
    cycle = ",".join(["phone"] * n_phone + ["laptop"] * n_laptop + ["server"] * (clients - n_phone - n_laptop))
    rows = [("homogeneous (server)", {"lora-rank": 8}),
            ("homogeneous (phone)", {"client-profiles": phone, "partition-profiles": "phone"})]
    for strategy in strategies:
        rows.append((f"tiers, {strategy}", {"client-profiles": profiles, "partition-profiles": cycle,
                                            "strategy": strategy}))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--strategies", default="fedavg,hetlora")
    parser.add_argument("--time-budget", type=float, default=1.0, help="the phones' seconds of training per round")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()

    from fedmm.config import Settings

    base, settings, work = prepare(args.run_config, args.rounds, "tiers")
    rows = []
    for name, overrides in tier_rows(settings, args.clients, args.strategies.split(","), args.time_budget):
        Settings.from_run_config({**base, **overrides})  # a bad row fails before any job runs
        report, wall = run_job(name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""),
                               {**base, **overrides}, args.clients, work)
        rounds = report["rounds"]
        done = [r for r in rounds if r > 0]
        acc = [rounds[r]["central/zs-acc"] for r in done]
        seconds = statistics.median(rounds[r]["round-seconds"] for r in done)
        train = [c for c in report["clients"] if c["phase"] == "train"]
        work_fraction = statistics.mean(c.get("work-fraction", 1.0) for c in train)
        declined = sum(rounds[r].get("failed-replies", 0.0) for r in done)
        uplink = statistics.median(rounds[r].get("train/bytes-uplink-total", 0.0) for r in done)
        rows.append((name, acc[-1], max(acc), seconds, work_fraction, declined, uplink))
        print(f"{name}: final zs-acc {acc[-1]:.4f}, median round {seconds:.1f} s, work {work_fraction:.2f}, "
              f"declined {declined:.0f}, {wall:.0f} s", flush=True)
    print(f"\n### tiers ({args.clients} clients, {args.rounds} rounds)\n")
    print("| run | final zs-acc | best zs-acc | median round (s) | mean work fraction | dropped out | uplink/round (KiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, final, best, seconds, fraction, declined, uplink in rows:
        print(f"| {name} | {final:.2%} | {best:.2%} | {seconds:.1f} | {fraction:.2f} | {declined:.0f} "
              f"| {uplink / 1024:.0f} |")
    print(f"\nresults: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
