"""Metrics history -> report folder: JSON, CSV, PNG plots, markdown summary.

``rounds`` maps round -> flat metrics (``central/*`` server held-out,
``evaluate/*`` federated evaluation, ``train/*`` aggregated client training,
plus round time and bytes); round 0 is the base before federation.
``clients`` has one row per client reply. Plain python + matplotlib.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = {
    "accuracy.png": ("zero-shot accuracy", ["central/zs-acc", "evaluate/zs-acc"], "central/zs-acc-group-"),
    "retrieval.png": ("retrieval Recall@1", ["central/i2t-R@1", "central/t2i-R@1"], None),
    "loss.png": ("loss", ["train/train-loss", "central/loss", "evaluate/loss"], None),
    "bytes.png": (
        "bytes per round",
        ["train/bytes-uplink-per-client", "train/bytes-uplink-total",
         "bytes/downlink-per-client", "bytes/downlink-total"],
        None,
    ),
}


def _columns(rounds: Mapping[int, Mapping[str, Any]]) -> list[str]:
    return sorted({k for row in rounds.values() for k in row})


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _plot(path: Path, title: str, rounds: Mapping[int, Mapping[str, Any]], keys: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        xs = [r for r in sorted(rounds) if key in rounds[r]]
        if xs:
            ax.plot(xs, [rounds[r][key] for r in xs], marker="o", label=key)
    if "bytes" in title:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: Any, key: str = "") -> str:
    if isinstance(v, float) and (v.is_integer() and ("num-" in key or "bytes" in key)):
        return f"{int(v):,}"  # counts and byte sizes, not rates
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(
    folder: str | Path,
    *,
    settings: Any,
    rounds: Mapping[int, Mapping[str, Any]],
    clients: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rounds = {int(r): dict(v) for r, v in sorted(rounds.items())}
    columns = _columns(rounds)
    paths = {
        "json": folder / "metrics.json",
        "csv": folder / "metrics.csv",
        "clients": folder / "clients.csv",
        "summary": folder / "summary.md",
    }
    config = settings.to_run_config() if hasattr(settings, "to_run_config") else dict(settings)
    paths["json"].write_text(
        json.dumps(
            {"config": config, "rounds": rounds, "clients": list(clients), "extra": dict(extra or {})},
            indent=1,
        )
    )
    _write_csv(paths["csv"], [{"round": r, **row} for r, row in rounds.items()], ["round", *columns])
    client_cols = sorted({k for row in clients for k in row}, key=lambda k: (k not in ("round", "phase", "partition-id"), k))
    _write_csv(paths["clients"], clients, client_cols)
    for name, (title, keys, group_prefix) in PLOTS.items():
        if group_prefix:
            keys = keys + [c for c in columns if c.startswith(group_prefix)]
        _plot(folder / name, title, rounds, keys)
        paths[name] = folder / name

    last = max(rounds) if rounds else 0
    base, final = rounds.get(0, {}), rounds.get(last, {})
    lines = [
        "# fedmm run report",
        "",
        f"Model `{config.get('model')}` (base: `{config.get('pretrained')}`), strategy "
        f"`{config.get('strategy')}`, {last} rounds, LoRA rank {config.get('lora-rank')}, "
        f"partitioner `{config.get('partitioner')}`"
        + (f" (alpha {config.get('dirichlet-alpha')})" if config.get("partitioner") == "dirichlet" else "")
        + ".",
        "",
        "## Before and after federation (server held-out split)",
        "",
        "| metric | base (round 0) | final (round %d) |" % last,
        "|---|---|---|",
    ]
    for key in sorted(k for k in final if k.startswith("central/")):
        lines.append(f"| {key.removeprefix('central/')} | {_fmt(base.get(key, ''), key)} | {_fmt(final[key], key)} |")
    lines += ["", "## Per round", "", "| round | " + " | ".join(_HEADLINE) + " |", "|---" * (len(_HEADLINE) + 1) + "|"]
    for r, row in rounds.items():
        lines.append(f"| {r} | " + " | ".join(_fmt(row.get(k, ""), k) for k in _HEADLINE) + " |")
    lines += ["", "## Per client, final round (federated evaluation)", ""]
    finals = [c for c in clients if c.get("phase") == "evaluate" and c.get("round") == last]
    if finals:
        lines += ["| partition | examples | zs-acc |", "|---|---|---|"]
        for c in sorted(finals, key=lambda c: c.get("partition-id", -1)):
            lines.append(f"| {c.get('partition-id')} | {c.get('num-examples')} | {_fmt(c.get('zs-acc', ''))} |")
    lines += ["", "## Files", ""]
    lines += [f"- `{p.name}`" for p in paths.values() if p.name != "summary.md"]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: `{v}`")
    paths["summary"].write_text("\n".join(lines) + "\n")
    return paths


_HEADLINE = [
    "central/zs-acc",
    "central/i2t-R@1",
    "central/t2i-R@1",
    "evaluate/zs-acc",
    "train/train-loss",
    "round-seconds",
    "train/bytes-uplink-per-client",
    "train/bytes-uplink-total",
    "bytes/downlink-per-client",
    "bytes/downlink-total",
]
