"""Scale: round time, server memory and fedmm's wrapper overhead at 10, 100 and 1000 clients.

    .venv/bin/python benchmarks/scale.py [--clients 10,100,1000] [--sampled 10] [--rounds 3]
        [--copies 20] [--run-config "k=v ..."]

Every row is one job in Flower's simulation engine with N virtual clients
(partitions) of which ``--sampled`` train and evaluate each round. The data
is the bundled digits' client split repeated ``--copies`` times with pixel
noise (a manifest written to a temporary folder), so that 1000 partitions
still hold ~16 pairs each; the server's held-out split is the bundled one.

From each job's report: median round seconds; the ServerApp process's RSS
after the first and the last round (flat across N = no per-client state);
median ``wrapper-seconds`` (fedmm's wrappers: decoding, validation,
multipliers, accounting, i.e. the whole chain's time minus the user
strategy's) and ``checkpoint-seconds``; and the overhead ratio
(wrapper + checkpoint) / (round - wrapper - checkpoint), the cost of fedmm's
server machinery relative to bare FedAvg's round on the same job (goal ≤ 5%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs import run_job  # noqa: E402  (this folder is on sys.path when a benchmark runs)


def write_manifest(folder: Path, copies: int, seed: int = 0) -> Path:
    """The digits' client split ``copies`` times (pixel noise ±8) plus its server split, as PNGs + JSONL."""
    from PIL import Image

    from fedmm.data import load_splits

    rng = np.random.default_rng(seed)
    splits = load_splits("digits")
    names = splits["clients"].features["label"].names
    rows = []
    for split, repeat in (("clients", copies), ("server", 1)):
        ds = splits[split]
        images = np.asarray(ds.with_format("numpy")["image"])
        for c in range(repeat):
            for i in range(len(ds)):
                image = images[i].astype(np.int16) + (rng.integers(-8, 9, images[i].shape) if c else 0)
                file = folder / f"{split}-{c}-{i}.png"
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(file)
                rows.append({"image": file.name, "caption": ds[i]["caption"], "label": names[ds[i]["label"]],
                             "group": ds[i]["group"], "toxic": ds[i]["toxic"], "split": split})
    manifest = folder / "scale.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()

    from fedmm.config.text import parse_run_config
    from fedmm.config import Settings
    from fedmm.pretrain import ensure_base_checkpoint

    base = {"model": "fedmm-tiny-vit", "local-steps": 4, "partitioner": "iid", "min-nodes": 2,
            **parse_run_config(args.run_config), "num-server-rounds": args.rounds}
    settings = Settings.from_run_config(base)
    work = Path(tempfile.mkdtemp(prefix="fedmm-bench-scale-"))
    data = work / "data"
    data.mkdir()
    # the base is built once on the bundled public split; the synthetic manifest has none
    base["pretrained"] = str(ensure_base_checkpoint(settings))
    base["dataset"] = str(write_manifest(data, args.copies))
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        fraction = min(1.0, args.sampled / n)
        overrides = {**base, "fraction-train": fraction, "fraction-evaluate": fraction}
        Settings.from_run_config(overrides)
        report, wall = run_job(f"clients-{n}", overrides, n, work)
        rounds = report["rounds"]
        done = sorted(r for r in rounds if r > 0)
        med = {k: statistics.median(rounds[r][k] for r in done)
               for k in ("round-seconds", "wrapper-seconds", "checkpoint-seconds")}
        overhead = med["wrapper-seconds"] + med["checkpoint-seconds"]
        ratio = overhead / (med["round-seconds"] - med["wrapper-seconds"])
        rss = (rounds[done[0]]["server-rss-mib"], rounds[done[-1]]["server-rss-mib"])
        replies = statistics.median(rounds[r].get("train/num-replies", 0) for r in done)
        rows.append((n, replies, med, rss, ratio, wall))
        print(f"{n} clients: {med}, rss {rss}, overhead {ratio:.2%}, {wall:.0f} s", flush=True)
    print(f"\n### scale ({args.sampled} sampled per round, {args.rounds} rounds, {settings.model})\n")
    print("| clients | replies/round | median round (s) | wrapper (s) | checkpoint (s) | overhead ratio "
          "| server RSS round 1 (MiB) | server RSS last round (MiB) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, replies, med, rss, ratio, wall in rows:
        print(f"| {n} | {replies:.0f} | {med['round-seconds']:.1f} | {med['wrapper-seconds']:.3f} "
              f"| {med['checkpoint-seconds']:.3f} | {ratio:.2%} | {rss[0]:.0f} | {rss[1]:.0f} | {wall:.0f} |")
    print(f"\nresults: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
