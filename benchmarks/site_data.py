"""Site data from disk: start-up and memory against the number of images, and the streaming loader's speed.

Two measurements (docs/benchmarks-log.md, "Site data"):

- ``--images 5000,20000,100000``: a site manifest of that many distinct
  small images; a fresh process (``CHILD``, which tests/test_site_memory.py
  runs too) runs the ClientApp's train handler on it
  (node config ``dataset``; a third argument: its ``decoded-images-mib``;
  tiny model) and reports the seconds to build the
  node (read the manifest, check each file's header, tokenise the captions)
  and its peak RSS;
- ``--throughput``: the default model at its 96 px, one client's local
  steps on a manifest of 128 px images, with batches decoded from the files
  per step (what a site does now) against the same images decoded once into
  an in-memory tensor beforehand (the old path's cost per step), runs
  alternating, medians; plus the loader alone (images per second decoded and
  transformed).

    .venv/bin/python benchmarks/site_data.py --images 5000,20000,100000 --throughput
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

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for attr in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, attr, 1)
from clients.app import app
from clients.node import node_of
from fedmm import lora
from fedmm.config import Settings
from fedmm.pretrain import load_base_model

run_config = {"model": "fedmm-tiny-vit", "pretrained": "none", "classes": "dark,light", "local-steps": 3,
              "batch-size": 16, "lora-rank": 2, "cache-dir": sys.argv[2]}
s = Settings.from_run_config(run_config)
net = lora.attach_lora(load_base_model(s, progress=False), s.lora_rank, s.lora_alpha, s.lora_target_list)
arrays = ArrayRecord(torch_state_dict=lora.adapter_state(net))
own = {"dataset": sys.argv[1], **({"decoded-images-mib": float(sys.argv[3])} if len(sys.argv) > 3 else {})}
context = Context(run_id=1, node_id=3, node_config=own, state=RecordDict(), run_config=run_config)
imported = time.perf_counter()
node_of(context)
built = time.perf_counter()
msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=3,
              message_type=MessageType.TRAIN)
reply = app(msg, context)
assert not reply.has_error(), reply.error
print(json.dumps({"node-build-seconds": built - imported, "train-seconds": time.perf_counter() - built,
                  "examples": reply.content["metrics"]["num-examples"],
                  "rss-mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_site(folder: Path, n: int, size: int) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        label = "dark" if i % 2 else "light"
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"a {label} square {i % 7}", "label": label}))
    (folder / "manifest.jsonl").write_text("\n".join(lines))
    return folder / "manifest.jsonl"


def memory_rows(counts: list[int], work: Path) -> list[dict]:
    rows = []
    for n in counts:
        start = time.perf_counter()
        manifest = write_site(work / f"site-{n}", n, 16)
        written = time.perf_counter() - start
        out = subprocess.run([sys.executable, "-c", CHILD, str(manifest), str(work / "cache")], cwd=ROOT,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        rows.append({"images": n, "write-seconds": round(written, 1), **json.loads(out.stdout.splitlines()[-1])})
        print(rows[-1], flush=True)
    return rows


def throughput(work: Path, repeats: int = 5, steps: int = 8, batch: int = 32) -> dict:
    import torch

    from fedmm import lora
    from fedmm import model as models
    from fedmm.config import Settings
    from fedmm.data import to_batch
    from fedmm.data.manifest import load_manifest
    from fedmm.pretrain import load_base_model
    from fedmm.train import train_steps

    s = Settings.from_run_config({"pretrained": "none", "cache-dir": str(work / "cache")})
    manifest = write_site(work / "photos", 512, 128)
    base = load_base_model(s, progress=False)
    mean, std, size = models.image_mean_std(base)
    tokenizer = models.create_tokenizer(s.model)
    streaming = to_batch(load_manifest(manifest, ("dark", "light"))[0]["clients"], tokenizer, mean, std, size)
    start = time.perf_counter()
    in_memory = streaming.subset(torch.arange(len(streaming)))  # every image decoded once
    decode_seconds = time.perf_counter() - start
    net = lora.attach_lora(base, s.lora_rank, s.lora_alpha, s.lora_target_list)
    times: dict[str, list[float]] = {"streaming": [], "in-memory": []}
    for r in range(repeats):
        for name, data in (("streaming", streaming), ("in-memory", in_memory)):
            stats = train_steps(net, data, steps=steps, batch_size=batch, lr=1e-4, seed=r)
            times[name].append(stats.seconds / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": s.model, "image-size": size, "batch": batch, "steps": steps, "repeats": repeats,
            "step-seconds-streaming": round(med["streaming"], 4), "step-seconds-in-memory": round(med["in-memory"], 4),
            "ratio": round(med["streaming"] / med["in-memory"], 3),
            "loader-images-per-second": round(len(streaming) / decode_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="", help="comma-separated image counts for the memory rows")
    parser.add_argument("--throughput", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmm-site-bench-") as tmp:
        work = Path(tmp)
        if args.images:
            memory_rows([int(n) for n in args.images.split(",")], work)
        if args.throughput:
            print(throughput(work), flush=True)


if __name__ == "__main__":
    main()
