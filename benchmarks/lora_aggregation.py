"""How LoRA updates are aggregated: naive A/B averaging vs products, equal and mixed ranks.

Runs the same job (Flower simulation, the path of `fedmm run`) once per
aggregation and prints one markdown row each: final and best central
zero-shot accuracy, final held-out ClipLoss, bytes per client per round.
Usage:

    .venv/bin/python benchmarks/lora_aggregation.py [--clients 10] [--run-config "k=v ..."]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmm.config.text import parse_run_config
from fedmm.deploy.simulation import run_simulation  # noqa: E402
from fedmm.config import Settings  # noqa: E402
from fedmm.pretrain import ensure_base_checkpoint  # noqa: E402

RUNS = [
    ("equal ranks (8): fedavg = mean(B) @ mean(A)", {"strategy": "fedavg"}),
    ("equal ranks (8): svdlora = SVD of mean(B_i A_i)", {"strategy": "svdlora"}),
    ("equal ranks (8): flora = exact mean(B_i A_i), merged", {"strategy": "flora"}),
    ("ranks 2,4,8: fedavg on zero-padded factors", {"strategy": "fedavg", "lora-ranks": "2,4,8"}),
    ("ranks 2,4,8: hetlora", {"strategy": "hetlora", "lora-ranks": "2,4,8"}),
    ("ranks 2,4,8: svdlora", {"strategy": "svdlora", "lora-ranks": "2,4,8"}),
    ("ranks 2,4,8: flora", {"strategy": "flora", "lora-ranks": "2,4,8"}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedmm-lora-agg-"))
    common = parse_run_config(args.run_config)
    ensure_base_checkpoint(Settings.from_run_config(common), progress=False)
    print("| aggregation | zs-acc base | zs-acc final | zs-acc best | central loss final | "
          "uplink B / client / round | downlink B / client (last round) |")
    print("|---|---|---|---|---|---|---|")
    for i, (label, overrides) in enumerate(RUNS):
        run_config = {**common, **overrides, "output-dir": str(work / f"run{i}")}
        code = run_simulation(ROOT, run_config, num_supernodes=args.clients, flwr_home=work / f"flwr{i}", stream=False)
        if code != 0:
            print(f"| {label} | failed ({code}), logs under {work / f'flwr{i}'} |||||| ", flush=True)
            continue
        rounds = {int(k): v for k, v in json.loads((work / f"run{i}" / "metrics.json").read_text())["rounds"].items()}
        last = rounds[max(rounds)]
        best = max(v["central/zs-acc"] for r, v in rounds.items() if r > 0)
        print(
            f"| {label} | {rounds[0]['central/zs-acc']:.4f} | {last['central/zs-acc']:.4f} | {best:.4f} "
            f"| {last['central/loss']:.3f} | {last['train/bytes-uplink-per-client']:,.0f} "
            f"| {last['bytes/downlink-per-client']:,.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
