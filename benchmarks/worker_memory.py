"""A ClientApp worker's LoRA step with glibc's malloc defaults against ``keep_freed_memory`` (fedmm supernode).

Each run is a fresh process with one torch thread (what a rehearsal's worker
gets on this machine): the default model, LoRA attached as a client does,
``fedmm.train.train_steps`` on random image-text batches; it reports the
median step after the first two, minor page faults and kernel seconds per
step, and its peak RSS. The two settings alternate, ``--pairs`` times.

    .venv/bin/python benchmarks/worker_memory.py [--steps 25] [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
if sys.argv[1] == "kept":
    from fedmm.deploy.supernode import keep_freed_memory
    assert keep_freed_memory()
from fedmm import lora
from fedmm import model as models
from fedmm.config import Settings
from fedmm.data import Batch
from fedmm.pretrain import load_base_model
from fedmm.train import train_steps

torch.set_num_threads(1)
steps = int(sys.argv[2])
s = Settings.from_run_config({})
net = lora.attach_lora(lora.swap_attention(load_base_model(s, progress=False)), s.lora_rank, s.lora_alpha,
                       s.lora_target_list)
_, _, size = models.image_mean_std(net)
n = s.batch_size
gen = torch.Generator().manual_seed(0)
data = Batch(torch.randn(n, 3, size, size, generator=gen), torch.randint(1, 1000, (n, 16), generator=gen),
             torch.arange(n), torch.zeros(n, dtype=torch.long))
ends = []
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
train_steps(net, data, steps=steps, batch_size=n, lr=1e-3, progress=lambda *_: ends.append(time.perf_counter()))
after = resource.getrusage(resource.RUSAGE_SELF)
times = sorted(b - a for a, b in list(zip([start, *ends], ends))[2:])  # the first two steps warm up
print(json.dumps({"step-s": times[len(times) // 2], "faults-per-step": (after.ru_minflt - before.ru_minflt) / steps,
                  "kernel-s-per-step": (after.ru_stime - before.ru_stime) / steps,
                  "peak-rss-mib": after.ru_maxrss / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    print("| glibc thresholds | median step (s) | minor faults per step | kernel s per step | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for _ in range(args.pairs):
        for mode in ("defaults", "kept"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.steps)], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {mode} | {r['step-s']:.3f} | {r['faults-per-step']:,.0f} | {r['kernel-s-per-step']:.3f} | "
                  f"{r['peak-rss-mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
