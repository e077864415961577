"""A site's memory does not grow with its number of images beyond its budget: images that do not fit node config
``decoded-images-mib`` stay files until a batch decodes them.

Each measurement is a fresh process that runs the ClientApp's train handler
on a site manifest (node config ``dataset``) and reports its peak RSS. The
old loader (every image decoded into one in-memory tensor at the model's size)
would add ~12 KiB per image here, 180 MiB between 5,000 and 20,000 images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    """benchmarks/site_data.py: its child process and its site writer (one copy of each)."""
    spec = importlib.util.spec_from_file_location("site_data", ROOT / "benchmarks" / "site_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_rss(*manifests: Path, cache: Path, budget_mib: float) -> list[dict]:
    """Each manifest's ClientApp in its own process, side by side (one core each), with that decoded budget."""
    child = _benchmark().CHILD
    procs = [subprocess.Popen([sys.executable, "-c", child, str(m), str(cache), str(budget_mib)], cwd=ROOT,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for m in manifests]
    found = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        found.append(json.loads(out.strip().splitlines()[-1]))
    return found


def test_a_sites_memory_does_not_grow_with_its_images_beyond_its_decoded_budget(tmp_path):
    """16 MiB of decoded images: less than either site's (4,000 and 16,000 at 32 px, 12 KiB each), so both decode
    per batch and the larger one's memory is the smaller one's."""
    site = _benchmark().write_site  # distinct 16x16 images: shared files would let the page cache decide
    small, large = _peak_rss(site(tmp_path / "5k", 5_000, 16), site(tmp_path / "20k", 20_000, 16),
                             cache=tmp_path / "cache", budget_mib=16)
    assert small["examples"] == 4_000 and large["examples"] == 16_000  # all of each site's rows, 20% held out
    assert large["rss-mib"] <= 1.10 * small["rss-mib"], (small, large)
