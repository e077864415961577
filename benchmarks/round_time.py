"""Per-round wall time, client step time and bytes per round for a fedmm job.

Runs the job in Flower's simulation engine (the same path as `fedmm run`) and
reads the run's metrics.json. Usage:

    .venv/bin/python benchmarks/round_time.py [--clients 10] [--run-config "k=v ..."]

Prints a markdown table (one row per round) and a summary line with medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmm.config.text import parse_run_config
from fedmm.deploy.simulation import run_simulation  # noqa: E402
from fedmm.config import Settings  # noqa: E402
from fedmm.pretrain import ensure_base_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedmm-bench-"))
    overrides = {**parse_run_config(args.run_config), "output-dir": str(work / "report")}
    settings = Settings.from_run_config(overrides)
    if settings.pretrained == "public-pretrain":
        ensure_base_checkpoint(settings)  # not part of the timed job
    start = time.perf_counter()
    code = run_simulation(ROOT, overrides, num_supernodes=args.clients, flwr_home=work / "flwr", stream=False)
    wall = time.perf_counter() - start
    if code != 0:
        print(f"job failed ({code}); logs under {work}", file=sys.stderr)
        return code
    data = json.loads((work / "report" / "metrics.json").read_text())
    rounds = {int(k): v for k, v in data["rounds"].items()}
    clients = data["clients"]
    print("| round | wall s | central zs-acc | median client step s | uplink bytes (all clients) | downlink bytes (all clients) |")
    print("|---|---|---|---|---|---|")
    times, steps = [], []
    for r in sorted(rounds):
        if r == 0:
            continue
        train = [c for c in clients if c["phase"] == "train" and c["round"] == r]
        up = sum(c["bytes-uplink"] for c in train)
        down = rounds[r].get("bytes/downlink-per-client", 0) * len(train)
        step = statistics.median(c["step-seconds"] for c in train)
        times.append(rounds[r]["round-seconds"])
        steps.append(step)
        print(f"| {r} | {rounds[r]['round-seconds']:.2f} | {rounds[r]['central/zs-acc']:.4f} | {step:.4f} | {up:,} | {down:,.0f} |")
    later = times[1:] or times
    print(
        f"\n{args.clients} clients, {len(times)} rounds: job wall {wall:.1f} s (incl. start-up); "
        f"round 1 {times[0]:.2f} s, median of later rounds {statistics.median(later):.2f} s; "
        f"median client step {statistics.median(steps):.4f} s; zero-shot accuracy "
        f"{rounds[0]['central/zs-acc']:.4f} -> {rounds[max(rounds)]['central/zs-acc']:.4f}; "
        f"adapter {data['extra']['adapter-bytes']:,} B vs base model {data['extra']['base-model-bytes']:,} B"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
