"""Codec benchmark: bytes per client per round, encode+decode time, accuracy.

    .venv/bin/python benchmarks/compression.py sizes      # bytes and codec time (no training)
    .venv/bin/python benchmarks/compression.py accuracy   # default task, each codec +/- error feedback

``sizes`` builds the default adapter and a ViT-B-32 adapter (LoRA r=8 on
attention + MLP, random weights: nothing is downloaded) and reports, per
codec, the uplink payload bytes exactly as Flower counts them, the ratio to
full-model fp32 FedAvg bytes, and the median encode+decode time.
``accuracy`` runs the default job (simulation engine, 10 clients) once per
codec and reports final zero-shot accuracy and uplink bytes per client.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmm import lora  # noqa: E402
from fedmm import model as models  # noqa: E402
from fedmm.compression import layout_of, make_codec, payload_bytes  # noqa: E402

CODECS = ["fp32", "fp16", "bf16", "q8", "q4", "q2", "q8-row", "topk0.1", "topk0.1+q8", "topk0.05+q4", "topk0.02+q8"]
ACCURACY_RUNS = [  # (codec, error feedback)
    ("fp32", False), ("fp16", False), ("q8", False), ("q4", False), ("q4", True),
    ("q2", False), ("q2", True), ("topk0.1+q8", True), ("topk0.05+q4", False), ("topk0.05+q4", True),
    ("topk0.02+q8", True),
]


def adapter_update(model_name: str) -> tuple[dict[str, np.ndarray], int]:
    torch.manual_seed(0)
    net = models.create_model(model_name, seed=0)
    full_bytes = sum(p.numel() * 4 for p in net.parameters())
    peft_model = lora.attach_lora(net, 8, 16.0, models.default_lora_targets(model_name))
    rng = np.random.default_rng(0)
    # A round's update: small, heavy-tailed values (bytes do not depend on them; time barely does).
    update = {k: (rng.standard_t(4, size=v.shape) * 1e-3).astype(np.float32) for k, v in lora.get_adapter_arrays(peft_model).items()}
    return update, full_bytes


def sizes() -> None:
    for name in ("fedmm-tiny-vit", "ViT-B-32"):
        update, full = adapter_update(name)
        n = sum(v.size for v in update.values())
        print(f"\n### {name}: adapter {n:,} parameters; full model fp32 {full:,} B\n")
        print("| codec | uplink B / client / round | × fewer than full-model fp32 FedAvg | × fewer than fp32 LoRA | encode+decode ms (median of 5) |")
        print("|---|---|---|---|---|")
        lora_fp32 = payload_bytes(make_codec("fp32").encode(update, np.random.default_rng(0)))
        for spec in CODECS:
            codec, rng, times = make_codec(spec), np.random.default_rng(0), []
            for _ in range(5):
                t = time.perf_counter()
                payload = codec.encode(update, rng)
                codec.decode(payload, layout_of(update))
                times.append(time.perf_counter() - t)
            b = payload_bytes(payload)
            print(f"| {spec} | {b:,} | {full / b:,.0f} | {lora_fp32 / b:.1f} | {1000 * statistics.median(times):.1f} |")


def accuracy(clients: int, rounds: int, extra: str, runs: list[tuple[str, bool]]) -> None:
    from fedmm.config.text import parse_run_config
from fedmm.deploy.simulation import run_simulation
    from fedmm.config import Settings
    from fedmm.pretrain import ensure_base_checkpoint

    base = parse_run_config(extra)
    ensure_base_checkpoint(Settings.from_run_config(base))
    print("| codec | error feedback | final zs-acc | mean zs-acc, last 3 rounds | uplink B / client / round | median round s | median encode s / client |")
    print("|---|---|---|---|---|---|---|")
    for spec, feedback in runs:
        work = Path(tempfile.mkdtemp(prefix="fedmm-codec-"))
        cfg = {**base, "codec": spec, "error-feedback": feedback, "num-server-rounds": rounds, "output-dir": str(work / "r")}
        code = run_simulation(ROOT, cfg, num_supernodes=clients, flwr_home=work / "flwr", stream=False)
        if code != 0:
            print(f"| {spec} | {feedback} | failed ({code}), logs in {work} | | | | |")
            continue
        data = json.loads((work / "r" / "metrics.json").read_text())
        rows = {int(k): v for k, v in data["rounds"].items()}
        last = max(rows)
        acc = [rows[r]["central/zs-acc"] for r in sorted(rows)[-3:]]
        train = [c for c in data["clients"] if c["phase"] == "train"]
        up = statistics.median(c["bytes-uplink"] for c in train)
        enc = statistics.median(c.get("encode-seconds", 0.0) for c in train)
        rt = statistics.median(rows[r]["round-seconds"] for r in rows if r > 1)
        print(f"| {spec} | {'yes' if feedback else 'no'} | {rows[last]['central/zs-acc']:.4f} | {np.mean(acc):.4f} | {up:,.0f} | {rt:.2f} | {enc:.4f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sizes", "accuracy"])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--runs", default="", help="accuracy runs to do, e.g. 'q4:ef,q2' (default: the full list)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "sizes":
        sizes()
    else:
        runs = [(r.split(":")[0], r.endswith(":ef")) for r in args.runs.split(",") if r] or ACCURACY_RUNS
        accuracy(args.clients, args.rounds, args.run_config, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
