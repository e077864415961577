"""Site folders for rehearsals, and a manifest's inventory (``fedmm data export`` / ``fedmm data inspect``).

``export_sites`` writes the run's partitions of a dataset (the bundled digits
or any manifest) as one folder per site, each a manifest over its own image
files, plus the server's held-out and the public pairs as folders of their
own and, in ``run/``, the name lists (``classes.txt``, ``groups.txt``) the
run config must carry (``classes='@<out>/run/classes.txt'``). A site's rows
are written in the partition's order, so a SuperNode given ``dataset =
<site>/manifest.jsonl`` holds out exactly what partition i would
(``site_split``): a deployment on exported folders trains on what the
simulation of the same run does.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset, Value
from PIL import Image

from .manifest import load_manifest
from .partition import client_partition

if TYPE_CHECKING:
    from ..config import Settings

MANIFEST = "manifest.jsonl"


def _write_folder(folder: Path, rows: Dataset, classes: list[str], groups: list[str]) -> int:
    """``rows`` as ``folder``/manifest.jsonl over ``folder``/images/; returns the number of rows written."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    from_files = isinstance(rows.features["image"], Value)
    lines = []
    for i, row in enumerate(rows):
        if from_files:
            source = Path(row["image"])
            name = f"{i:06d}{source.suffix.lower() or '.png'}"
            shutil.copyfile(source, images / name)
        else:  # the digits' rendered arrays, lossless
            name = f"{i:06d}.png"
            Image.fromarray(np.asarray(row["image"], dtype=np.uint8)).save(images / name)
        entry: dict[str, Any] = {"image": f"images/{name}", "caption": row["caption"], "toxic": bool(row["toxic"])}
        if row["label"] >= 0:
            entry["label"] = classes[row["label"]]
        entry["group"] = groups[row["group"]] if row["group"] < len(groups) else str(row["group"])
        if row.get("client"):
            entry["client"] = row["client"]
        lines.append(json.dumps(entry))
    (folder / MANIFEST).write_text("\n".join(lines) + "\n")
    return len(lines)


def export_sites(settings: Settings, out: Path, num_sites: int) -> dict[str, int]:
    """The run's ``num_sites`` partitions of its dataset as ``out``/site-<i>/, plus ``out``/server/,
    ``out``/public/ and ``out``/run/{classes,groups}.txt; returns the rows written per folder."""
    from . import class_names, client_rows, group_names, public_split, server_split

    clients = client_rows(settings)
    classes = class_names(clients)
    groups = list(settings.group_list) or group_names(clients)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for i in range(num_sites):
        rows = client_partition(settings, clients, i, num_sites)
        written[f"site-{i}"] = _write_folder(out / f"site-{i}", rows, classes, groups)
    written["server"] = _write_folder(out / "server", server_split(settings), classes, groups)
    written["public"] = _write_folder(out / "public", public_split(settings), classes, groups)
    (out / "run").mkdir(exist_ok=True)
    (out / "run" / "classes.txt").write_text("\n".join(classes) + "\n")
    (out / "run" / "groups.txt").write_text("\n".join(groups) + "\n")
    return written


def inspect_manifest(path: Path, classes: tuple[str, ...] = (), groups: tuple[str, ...] = (),
                     decode: bool = False) -> dict[str, Any]:
    """What a manifest holds: rows kept and skipped (with reasons), classes, groups, per-split and per-client
    counts. ``decode``: also decode every kept image in full (catches truncated files loading only checks
    the header of)."""
    splits, report = load_manifest(path, classes, groups)
    skipped = dict(report.skipped)
    kept = 0
    per_split: dict[str, int] = {}
    per_client: Counter[str] = Counter()
    per_class: Counter[str] = Counter()
    per_group: Counter[str] = Counter()
    for name, rows in splits.items():
        if decode and len(rows):
            bad = []
            for file in rows["image"]:
                try:
                    with Image.open(file) as im:
                        im.load()
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
                    skipped[file] = f"does not decode: {type(exc).__name__}"
                    bad.append(file)
            rows = rows.filter(lambda r: r["image"] not in bad) if bad else rows
        per_split[name] = len(rows)
        kept += len(rows)
        names, group_list = rows.features["label"].names, rows.features["group"]
        per_class.update(names[label] if label >= 0 else "(none)" for label in rows["label"])
        per_group.update(group_list.names[g] if hasattr(group_list, "names") else str(g) for g in rows["group"])
        per_client.update(c or "(none)" for c in rows["client"])
    first = next(iter(splits.values()))
    return {
        "manifest": str(path), "rows": report.rows, "kept": kept, "skipped": skipped,
        "prompted": report.prompted, "classes": list(first.features["label"].names),
        "per-split": per_split, "per-class": dict(per_class), "per-group": dict(per_group),
        "per-client": dict(per_client),
    }
