"""Base models compared on the default task: accuracy before/after federation, cost.

For each model, builds its public-split base (timed: from-scratch pretraining
for fedmm-tiny-vit, heads alignment for effnet-lite0-minilm), then runs the
default job with that model in Flower's simulation engine (the path of
`fedmm run`) and reads the run's metrics.json. Usage:

    .venv/bin/python benchmarks/models.py [--models fedmm-tiny-vit,effnet-lite0-minilm]
        [--clients 10] [--run-config "k=v ..."]

Prints one markdown row per model.
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


def measure(model: str, clients: int, extra: dict, work: Path) -> dict:
    overrides = {**extra, "model": model, "output-dir": str(work / model / "report")}
    settings = Settings.from_run_config(overrides)
    start = time.perf_counter()
    ensure_base_checkpoint(settings, progress=False)  # in a fresh cache dir: really built
    base_seconds = time.perf_counter() - start
    start = time.perf_counter()
    code = run_simulation(ROOT, overrides, num_supernodes=clients, flwr_home=work / model / "flwr", stream=False)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{model}: job failed ({code}); logs under {work / model}")
    data = json.loads((work / model / "report" / "metrics.json").read_text())
    rounds = {int(k): v for k, v in data["rounds"].items()}
    train = [c for c in data["clients"] if c["phase"] == "train"]
    examples = sorted(c["num-examples"] for c in train if c["round"] == 1)
    return {
        "model": model,
        "base-seconds": base_seconds,
        "base-acc": rounds[0]["central/zs-acc"],
        "final-acc": rounds[max(rounds)]["central/zs-acc"],
        "rounds": max(rounds),
        "examples": examples,
        "step": statistics.median(c["step-seconds"] for c in train),
        "round": statistics.median(rounds[r]["round-seconds"] for r in rounds if r >= 2),
        "wall": wall,
        "adapter-bytes": data["extra"]["adapter-bytes"],
        "base-bytes": data["extra"]["base-model-bytes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fedmm-tiny-vit,effnet-lite0-minilm")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedmm-models-"))
    extra = {"cache-dir": str(work / "cache"), **parse_run_config(args.run_config)}
    print(
        "| model | base build s | zs-acc base | zs-acc final | rounds | train examples per client "
        "(min / median / max) | median client step s | median round s | job wall s | adapter / base bytes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        m = measure(model.strip(), args.clients, extra, work)
        ex = m["examples"]
        print(
            f"| {m['model']} | {m['base-seconds']:.0f} | {m['base-acc']:.4f} | {m['final-acc']:.4f} | {m['rounds']} "
            f"| {ex[0]} / {statistics.median(ex):.0f} / {ex[-1]} | {m['step']:.3f} | {m['round']:.1f} "
            f"| {m['wall']:.0f} | {m['adapter-bytes']:,} / {m['base-bytes']:,} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
