"""A site's memory does not grow with its number of images: images stay files until a batch decodes them.

Each measurement is a fresh process that runs the ClientApp's train handler
on a site manifest (node config ``dataset``) and reports its peak RSS. The
old loader (every image decoded into one in-memory tensor at the model's size)
would add ~12 KiB per image here, 180 MiB between 5,000 and 20,000 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for attr in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, attr, 1)
from clients.app import app
from fedmm import lora
from fedmm.config import Settings
from fedmm.pretrain import load_base_model

run_config = {"model": "fedmm-tiny-vit", "pretrained": "none", "classes": "dark,light", "local-steps": 3,
              "batch-size": 16, "lora-rank": 2, "cache-dir": sys.argv[2]}
s = Settings.from_run_config(run_config)
net = lora.attach_lora(load_base_model(s, progress=False), s.lora_rank, s.lora_alpha, s.lora_target_list)
arrays = ArrayRecord(torch_state_dict=lora.adapter_state(net))
context = Context(run_id=1, node_id=3, node_config={"dataset": sys.argv[1]}, state=RecordDict(), run_config=run_config)
msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=3,
              message_type=MessageType.TRAIN)
start = time.perf_counter()
reply = app(msg, context)
assert not reply.has_error(), reply.error
print(json.dumps({"rss-mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "examples": reply.content["metrics"]["num-examples"], "seconds": time.perf_counter() - start}))
"""


def _site(folder: Path, n: int) -> Path:
    """``n`` distinct 16x16 images (a few shared files would let the page cache, not the loader, decide)."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(n)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        label = "dark" if i % 2 else "light"
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"a {label} square {i % 7}", "label": label}))
    (folder / "manifest.jsonl").write_text("\n".join(lines))
    return folder / "manifest.jsonl"


def _peak_rss(*manifests: Path, cache: Path) -> list[dict]:
    """Each manifest's ClientApp in its own process, side by side (one core each)."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(m), str(cache)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for m in manifests]
    found = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        found.append(json.loads(out.strip().splitlines()[-1]))
    return found


def test_a_sites_memory_does_not_grow_with_its_images(tmp_path):
    small, large = _peak_rss(_site(tmp_path / "5k", 5_000), _site(tmp_path / "20k", 20_000), cache=tmp_path / "cache")
    assert small["examples"] == 4_000 and large["examples"] == 16_000  # all of each site's rows, 20% held out
    assert large["rss-mib"] <= 1.10 * small["rss-mib"], (small, large)
