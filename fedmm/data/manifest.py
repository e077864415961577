"""User data: a CSV or JSONL manifest over an image folder, via HF ``datasets``.

Columns: ``image`` (path, relative to the manifest's folder unless absolute)
is required, and ``caption`` or ``label``; ``label`` (class id or name),
``group`` (protected attribute: id or name, e.g. ``female``), ``client`` (natural-partition id), ``split`` (public /
clients / server) and ``toxic`` (bool) are optional. Missing modalities are
never fatal: a row with a label but no caption trains on a class-prompt
caption ("a photo of {class}."), counted in ``ManifestReport.prompted``;
rows whose image is missing or unreadable, or that have neither caption nor
label, are skipped and counted, and the report names them.

Labels and groups are ids when every value is an integer (a CSV column of
integers with blanks reads as floats such as 3.0: those count as integers),
and names otherwise; in a column that mixes names and integers, every value
is a name ("3" among "cat" and "dog"). When the run names the federation's
class list (``classes``; likewise ``groups``), labels are looked up in it
(a name, or an integer index into it), and a label outside it is an error
naming the offending values: every site's label 3 must mean one class.

No pixels are read here: a kept row's image is its file path, checked to
open as an image (PIL reads only the header); batches decode the files at the
model's own resolution (fedmm/data/images.py), so loading costs no memory per
image and no decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, disable_progress_bars

from .digits import SPLITS
from .schema import features

log = logging.getLogger(__name__)
REQUIRED = ("image",)
CAPTION_FROM_LABEL = "a photo of {name}."  # the caption of a labelled image that came without one


class ManifestError(ValueError):
    """The manifest itself is unusable (missing file or required column)."""


@dataclass
class ManifestReport:
    rows: int = 0
    kept: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # image path -> reason
    prompted: int = 0  # kept rows whose caption is their class prompt (no caption given)


def _read_rows(path: Path) -> Dataset:
    disable_progress_bars()  # a progress bar per manifest read is noise in every client's log
    if path.suffix.lower() == ".csv":
        return Dataset.from_csv(str(path), keep_in_memory=True)
    if path.suffix.lower() in (".jsonl", ".json"):
        return Dataset.from_json(str(path), keep_in_memory=True)
    raise ManifestError(f"manifest {path}: expected a .csv or .jsonl file")


def _probe_image(file: Path) -> None:
    """Raise unless ``file`` opens as an image (its header only: no pixels are decoded)."""
    from PIL import Image

    with Image.open(file) as im:
        im.size  # noqa: B018 - the header is parsed on open; a non-image raises there


def _as_int(value: object) -> int | None:
    """The integer a value stands for (3, 3.0, True aside), or None when it is a name."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _vocabulary(values: list[object], empty: str):
    """(names, value -> id) for a label or group column: ids if every value is an integer, else names."""
    present = [v for v in values if v is not None]
    ints = [i for v in present if (i := _as_int(v)) is not None and i >= 0]
    if len(ints) == len(present):
        top = max(ints, default=-1)
        return ([str(i) for i in range(top + 1)] or [empty]), _as_int
    def text(v: object) -> str:  # 3.0 from a CSV column with blanks is the name "3"
        i = _as_int(v)
        return str(i) if i is not None else str(v).strip()

    names = sorted({text(v) for v in present})
    index = {n: i for i, n in enumerate(names)}
    return names, lambda v: index[text(v)]


def _fixed_vocabulary(values: list[object], names: list[str], column: str, key: str, path: Path):
    """(names, value -> id) for a column whose names the run fixed: a name, or an integer index into them."""
    index = {n: i for i, n in enumerate(names)}

    def lookup(v: object) -> int | None:
        i = _as_int(v)
        if i is not None and str(i) not in index:
            return i if 0 <= i < len(names) else None
        return index.get(str(v).strip() if i is None else str(i))

    unknown = sorted({str(v) for v in values if v is not None and lookup(v) is None})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ManifestError(f"manifest {path}: column '{column}' holds {shown}, not in the run's '{key}' "
                            f"({len(names)} names: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    return list(names), lookup


def load_manifest(
    path: str | Path, classes: Sequence[str] = (), groups: Sequence[str] = ()
) -> tuple[dict[str, Dataset], ManifestReport]:
    """Manifest -> splits with the bundled dataset's columns (images as file paths), plus what was skipped.

    ``classes`` / ``groups``: the run's names for labels and groups (empty: the manifest's own values).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}")
    table = _read_rows(path)
    missing_cols = [c for c in REQUIRED if c not in table.column_names]
    if "caption" not in table.column_names and "label" not in table.column_names:
        missing_cols.append("caption or label")
    if missing_cols:
        raise ManifestError(f"manifest {path}: missing required column(s) {missing_cols}")
    rows = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()}  # CSV blanks read as NaN
            for r in table.to_list()]
    labels, group_values = [r.get("label") for r in rows], [r.get("group") for r in rows]
    names, to_label = (_fixed_vocabulary(labels, list(classes), "label", "classes", path) if classes
                       else _vocabulary(labels, "unlabelled"))
    group_names, to_group = (_fixed_vocabulary(group_values, list(groups), "group", "groups", path) if groups
                             else _vocabulary(group_values, "0"))
    schema = features(names, None, group_names)
    report = ManifestReport(rows=len(rows))
    out: dict[str, dict[str, list]] = {s: {k: [] for k in schema} for s in SPLITS}
    for i, r in enumerate(rows):
        file = Path(str(r["image"]))
        file = file if file.is_absolute() else path.parent / file
        split = str(r.get("split") or "clients")
        if split not in SPLITS:
            raise ManifestError(f"manifest {path} row {i + 1}: split '{split}' not in {SPLITS}")
        raw_caption = r.get("caption")
        caption = raw_caption.strip() if isinstance(raw_caption, str) else ""
        label = r.get("label")
        if not caption and label is None:
            report.skipped[str(file)] = "no caption and no label"
            continue
        if not file.is_file():
            report.skipped[str(file)] = "missing"
            continue
        try:
            _probe_image(file)
        except Exception as exc:  # PIL raises many types for corrupt files
            report.skipped[str(file)] = f"unreadable: {type(exc).__name__}"
            continue
        label = -1 if label is None else to_label(label)
        if not caption:
            caption = CAPTION_FROM_LABEL.format(name=names[label])
            report.prompted += 1
        o = out[split]
        o["image"].append(str(file))
        o["caption"].append(caption)
        o["label"].append(label)
        o["group"].append(to_group(r["group"]) if r.get("group") is not None else 0)
        o["toxic"].append(bool(r.get("toxic") or False))
        o["client"].append(str(r["client"]) if r.get("client") is not None else "")
        report.kept += 1
    if report.prompted:
        log.info("manifest %s: %d rows without a caption train on their class prompt", path, report.prompted)
    if report.skipped:
        shown = ", ".join(f"{f} ({why})" for f, why in list(report.skipped.items())[:5])
        log.warning("manifest %s: skipped %d of %d rows: %s", path, len(report.skipped), report.rows, shown)
    if report.kept == 0:
        raise ManifestError(f"manifest {path}: no usable rows ({len(report.skipped)} skipped)")
    return {s: Dataset.from_dict(out[s], features=schema) for s in SPLITS}, report
