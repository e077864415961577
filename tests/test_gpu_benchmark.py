"""benchmarks/gpu.py at CPU size: the script the GPU rows of docs/benchmarks-log.md come from runs end to end and
writes its table (the GPU run is the same script with --device cuda)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    """benchmarks/gpu.py as a module."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_device_benchmark_writes_its_table_at_cpu_size(tmp_path):
    bench = _benchmark()
    out = tmp_path / "gpu.md"
    assert bench.main(["--device", "cpu", "--models", "fedmm-tiny-vit", "--clients", "2", "--steps", "2",
                       "--batch", "4", "--repeats", "1", "--out", str(out)]) == 0
    header, rule, row = out.read_text().strip().splitlines()
    cells = dict(zip((c.strip() for c in header.strip("|").split("|")), (c.strip() for c in row.strip("|").split("|"))))
    assert cells["model"] == "fedmm-tiny-vit" and cells["device"] == "cpu" and cells["clients x steps x batch"] == "2 x 2 x 4"
    assert float(cells["bare round (s)"]) > 0 and float(cells["fedmm / bare"].rstrip("x")) > 0
    assert float(cells["samples/s"]) > 0 and cells["peak memory"].endswith("(process RSS)")


def test_the_device_benchmark_times_a_sites_image_files_decoded_once_and_per_batch(tmp_path):
    bench = _benchmark()
    out = tmp_path / "gpu.md"
    assert bench.main(["--device", "cpu", "--models", "fedmm-tiny-vit", "--clients", "1", "--steps", "2",
                       "--batch", "4", "--repeats", "1", "--files", "8", "--out", str(out)]) == 0
    tables = out.read_text().strip().split("\n\n")
    assert len(tables) == 2
    header, _rule, *rows = tables[1].splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = [dict(zip(names, (c.strip() for c in row.strip("|").split("|")))) for row in rows]
    assert [c["images are"] for c in cells] == ["decoded once (fits decoded-images-mib)", "decoded per batch (in line)"]
    for c in cells:
        assert c["images"] == "8" and float(c["step (s)"]) > 0 and 0 <= float(c["data share of a step"].rstrip("%")) <= 100
    # decoding every batch's files waits longer for data than indexing decoded tensors does
    assert float(cells[1]["data share of a step"].rstrip("%")) > float(cells[0]["data share of a step"].rstrip("%"))
