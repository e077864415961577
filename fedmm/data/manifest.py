"""User data: a CSV or JSONL manifest over an image folder, via HF ``datasets``.

Columns: ``image`` (path, relative to the manifest's folder unless absolute)
and ``caption`` are required; ``label`` (int or class name), ``group`` (int),
``client`` (natural-partition id), ``split`` (public / clients / server) and
``toxic`` (bool) are optional. Rows whose image is missing or unreadable are
skipped and counted, never fatal; the report of what was skipped names the
files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset

from .digits import SPLITS
from .schema import features

log = logging.getLogger(__name__)
REQUIRED = ("image", "caption")


class ManifestError(ValueError):
    """The manifest itself is unusable (missing file or required column)."""


@dataclass
class ManifestReport:
    rows: int = 0
    kept: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # image path -> reason


def _read_rows(path: Path) -> Dataset:
    if path.suffix.lower() == ".csv":
        return Dataset.from_csv(str(path), keep_in_memory=True)
    if path.suffix.lower() in (".jsonl", ".json"):
        return Dataset.from_json(str(path), keep_in_memory=True)
    raise ManifestError(f"manifest {path}: expected a .csv or .jsonl file")


def _load_image(file: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(file) as im:
        im.load()
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def load_manifest(path: str | Path, image_size: int = 32) -> tuple[dict[str, Dataset], ManifestReport]:
    """Manifest -> splits with the bundled dataset's columns, plus what was skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}")
    table = _read_rows(path)
    missing_cols = [c for c in REQUIRED if c not in table.column_names]
    if missing_cols:
        raise ManifestError(f"manifest {path}: missing required column(s) {missing_cols}")
    rows = table.to_list()
    labels = [r.get("label") for r in rows]
    names = sorted({str(v) for v in labels if v is not None and not isinstance(v, int)})
    if names:
        to_id = {n: i for i, n in enumerate(names)}
    else:
        ids = sorted({int(v) for v in labels if v is not None})
        names = [str(i) for i in range(max(ids) + 1)] if ids else ["unlabelled"]
        to_id = None
    schema = features(names, image_size)
    report = ManifestReport(rows=len(rows))
    out: dict[str, dict[str, list]] = {s: {k: [] for k in schema} for s in SPLITS}
    for i, r in enumerate(rows):
        file = Path(str(r["image"]))
        file = file if file.is_absolute() else path.parent / file
        split = str(r.get("split") or "clients")
        if split not in SPLITS:
            raise ManifestError(f"manifest {path} row {i + 1}: split '{split}' not in {SPLITS}")
        if not file.is_file():
            report.skipped[str(file)] = "missing"
            continue
        try:
            image = _load_image(file, image_size)
        except Exception as exc:  # PIL raises many types for corrupt files
            report.skipped[str(file)] = f"unreadable: {type(exc).__name__}"
            continue
        label = r.get("label")
        label = -1 if label is None else (to_id[str(label)] if to_id else int(label))
        o = out[split]
        o["image"].append(image)
        o["caption"].append(str(r["caption"]))
        o["label"].append(label)
        o["group"].append(int(r["group"]) if r.get("group") is not None else 0)
        o["toxic"].append(bool(r.get("toxic") or False))
        o["client"].append(str(r["client"]) if r.get("client") is not None else "")
        report.kept += 1
    if report.skipped:
        shown = ", ".join(f"{f} ({why})" for f, why in list(report.skipped.items())[:5])
        log.warning("manifest %s: skipped %d of %d rows: %s", path, len(report.skipped), report.rows, shown)
    if report.kept == 0:
        raise ManifestError(f"manifest {path}: no usable rows ({len(report.skipped)} skipped)")
    return {s: Dataset.from_dict(out[s], features=schema) for s in SPLITS}, report
