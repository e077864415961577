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

from .config import Settings  # noqa: E402

PLOTS = {
    "accuracy.png": ("zero-shot accuracy", ["central/zs-acc", "evaluate/zs-acc"], "central/zs-acc-group-"),
    "retrieval.png": ("retrieval Recall@1", ["central/i2t-R@1", "central/t2i-R@1"], None),
    "audit.png": (
        "audit: robust accuracy and cross-modal consistency (fedmm/audit.py)",
        ["central/zs-acc", "central/robust-acc-noise", "central/robust-acc-blur", "central/consistency-cosine",
         "central/consistency-agreement-noise", "central/consistency-agreement-blur", "evaluate/robust-acc-noise",
         "evaluate/robust-acc-blur", "evaluate/consistency-cosine"],
        None,
    ),
    "loss.png": ("loss", ["train/train-loss", "central/loss", "evaluate/loss"], None),
    "fairness.png": (
        "group fairness and toxic retrieval",
        ["central/acc-gap", "central/dp-gap", "central/eo-gap", "central/toxic-top1", "central/toxic-mass",
         "evaluate/acc-gap", "evaluate/toxic-top1", "evaluate/client-acc-std"],
        None,
    ),
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


FAIRNESS_COLUMNS = ("central/zs-acc", "central/acc-gap", "central/worst-group-acc", "central/dp-gap",
                    "central/eo-gap", "central/toxic-top1", "central/toxic-mass", "evaluate/acc-gap",
                    "evaluate/toxic-top1", "evaluate/client-acc-min", "evaluate/client-acc-std")


def _fairness_lines(rounds: Mapping[int, Mapping[str, Any]], constraints: str,
                    group_names: Sequence[str] | None = None) -> list[str]:
    """Per round: accuracy, gaps, toxic retrieval, multipliers; then the final per-group table."""
    keys = [k for k in FAIRNESS_COLUMNS if any(k in row for row in rounds.values())]
    keys += sorted({k for row in rounds.values() for k in row if k.startswith("constraints/")})
    if not keys:
        return []
    lines = ["", "## Fairness and toxicity", ""]
    lines.append(f"Constraints: {constraints or 'none (measured only)'}. `central/` = server held-out split "
                 "(fairlearn on the predictions), `evaluate/` = summed client counts; `constraints/` = the "
                 "training-time values the multipliers follow and the multiplier each round trained with.")
    lines += ["", "| round | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r, row in rounds.items():
        lines.append(f"| {r} | " + " | ".join(_fmt(row.get(k, ""), k) for k in keys) + " |")
    last = max(rounds)
    groups = sorted({int(k.rsplit("-", 1)[1]) for row in rounds.values() for k in row
                     if k.startswith(("central/zs-acc-group-", "evaluate/zs-acc-group-"))})
    if groups:
        lines += ["", f"Per group, base (round 0) and final (round {last}):", "",
                  "| group | server examples | central base | central final | federated final |", "|---|---|---|---|---|"]
        base, final = rounds.get(0, {}), rounds[last]
        for g in groups:
            name = group_names[g] if group_names and g < len(group_names) else str(g)
            lines.append(f"| {name} | {_fmt(final.get(f'central/num-examples-group-{g}', ''), 'num-')} | "
                         f"{_fmt(base.get(f'central/zs-acc-group-{g}', ''))} | "
                         f"{_fmt(final.get(f'central/zs-acc-group-{g}', ''))} | "
                         f"{_fmt(final.get(f'evaluate/zs-acc-group-{g}', ''))} |")
    return lines


EPSILON_KEYS = ("privacy/epsilon", "train/dp-epsilon-max")  # server ledger; the weakest client's own ledger


def _privacy_utility(path: Path, rounds: Mapping[int, Mapping[str, Any]]) -> None:
    """Accuracy against the epsilon spent so far: one point per round (round 0 at epsilon 0)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in EPSILON_KEYS:
        xs = [r for r in sorted(rounds) if key in rounds[r] and "central/zs-acc" in rounds[r]]
        if xs:
            eps = [0.0] + [rounds[r][key] for r in xs]
            acc = [rounds.get(0, {}).get("central/zs-acc", float("nan"))] + [rounds[r]["central/zs-acc"] for r in xs]
            ax.plot(eps, acc, marker="o", label=f"central/zs-acc vs {key}")
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel("zero-shot accuracy (server held-out)")
    ax.set_title("privacy-utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _privacy_lines(privacy: Mapping[str, Any], rounds: Mapping[int, Mapping[str, Any]],
                   failures: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["", "## Privacy", "", f"Mode `{privacy['dp']}`: {privacy['guarantee']}.", ""]
    lines.append(
        f"Noise multiplier {privacy['noise-multiplier']}, clipping norm {privacy['clip-norm']}, "
        f"delta {privacy['delta']:g}, budget (max-epsilon) {privacy['max-epsilon'] or 'none'}, "
        f"{privacy['clients']} clients."
    )
    if privacy.get("asynchronous"):
        lines += ["", f"{privacy['asynchronous'][0].upper()}{privacy['asynchronous'][1:]}."]
    for note in privacy.get("notes", []):
        lines.append(f"- warning: {note}")
    outside = privacy.get("outside-guarantee", [])
    if outside:
        lines += ["", "What leaves a client outside this guarantee (raw training losses are not sent under DP):", ""]
        lines += [f"- {item}" for item in outside]
    keys = [k for k in EPSILON_KEYS if any(k in row for row in rounds.values())]
    if keys:
        lines += ["", "| round | " + " | ".join(keys) + " | central/zs-acc |", "|---" * (len(keys) + 2) + "|"]
        for r, row in rounds.items():
            if r > 0:
                lines.append(f"| {r} | " + " | ".join(_fmt(row.get(k, ""), k) for k in keys)
                             + f" | {_fmt(row.get('central/zs-acc', ''))} |")
    declined = [f for f in failures if "budget" in str(f.get("reason", ""))]
    if declined:
        lines += ["", "Clients that stopped training because their budget was spent:", ""]
        lines += [f"- round {f['round']}: {f['reason']}" for f in declined]
    return lines


def _fmt(v: Any, key: str = "") -> str:
    if isinstance(v, float) and (v.is_integer() and ("num-" in key or "bytes" in key)):
        return f"{int(v):,}"  # counts and byte sizes, not rates
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(
    folder: str | Path,
    *,
    settings: Settings,
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
    config = settings.to_run_config()
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

    privacy = (extra or {}).get("privacy")
    if privacy and privacy.get("dp") != "none":
        _plot(folder / "privacy.png", "epsilon per round", rounds, list(EPSILON_KEYS))
        _privacy_utility(folder / "privacy_utility.png", rounds)
        paths["privacy.png"] = folder / "privacy.png"
        paths["privacy_utility.png"] = folder / "privacy_utility.png"

    applied = [c for c in clients if c.get("phase") == "train" and "staleness" in c]
    if applied:  # an asynchronous run: how stale the applied updates were, and whose they were
        _staleness_plot(folder / "staleness.png", applied)
        paths["staleness.png"] = folder / "staleness.png"

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
    lines += _fairness_lines(rounds, config.get("constraints", ""), (extra or {}).get("group-names"))
    if privacy and privacy.get("dp") != "none":
        lines += _privacy_lines(privacy, rounds, (extra or {}).get("failed-replies", []))
    if privacy and privacy.get("secure-aggregation"):
        lines += ["", "## Secure aggregation", "", f"{privacy['secure-aggregation']}."]
    if applied:
        lines += _asynchrony_lines(applied)
    for key, title in (("failed-replies", "Failed replies (crashes, declines, errors)"),
                       ("dropped-updates", "Dropped updates (before aggregation)")):
        rows = (extra or {}).get(key, [])
        if rows:
            lines += ["", f"## {title}", "", "| round | node | reason |", "|---|---|---|"]
            lines += [f"| {f['round']} | {f['node']} | {f['reason']} |" for f in rows]
    lines += ["", "## Files", ""]
    lines += [f"- `{p.name}`" for p in paths.values() if p.name != "summary.md"]
    for k, v in (extra or {}).items():
        if k not in ("privacy", "failed-replies", "dropped-updates", "group-names"):
            lines.append(f"- {k}: `{v}`")
    paths["summary"].write_text("\n".join(lines) + "\n")
    return paths


def _staleness_plot(path: Path, applied: Sequence[Mapping[str, Any]]) -> None:
    """Staleness of the applied updates: over the run, and per aggregation (stacked by tau)."""
    taus = sorted({int(c["staleness"]) for c in applied})
    aggregations = sorted({int(c["round"]) for c in applied})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(taus, [sum(int(c["staleness"]) == t for c in applied) for t in taus], color="tab:blue")
    left.set_xlabel("staleness tau (versions applied while the client trained)")
    left.set_ylabel("updates applied")
    left.set_title("over the run")
    bottom = [0] * len(aggregations)
    for tau in taus:
        counts = [sum(int(c["staleness"]) == tau and int(c["round"]) == a for c in applied) for a in aggregations]
        right.bar(aggregations, counts, bottom=bottom, label=f"tau={tau}")
        bottom = [b + n for b, n in zip(bottom, counts)]
    right.set_xlabel("aggregation")
    right.set_title("per aggregation")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _asynchrony_lines(applied: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per client: updates applied, their staleness, the global versions they trained on."""
    lines = ["", "## Asynchronous aggregation (per client)", "",
             "| partition | updates applied | mean staleness | max staleness | versions trained on |",
             "|---|---|---|---|---|"]
    for pid in sorted({c.get("partition-id", -1) for c in applied}):
        rows = [c for c in applied if c.get("partition-id", -1) == pid]
        taus = [float(c["staleness"]) for c in rows]
        versions = ", ".join(str(int(c.get("trained-on-version", -1))) for c in rows)
        lines.append(f"| {pid} | {len(rows)} | {sum(taus) / len(taus):.2f} | {max(taus):.0f} | {versions} |")
    return lines + ["", "Staleness histogram: `staleness.png`."]


_HEADLINE = [
    "central/zs-acc",
    "central/i2t-R@1",
    "central/t2i-R@1",
    "central/grounding",
    "evaluate/zs-acc",
    "train/train-loss",
    "train/work-fraction",
    "round-seconds",
    "train/bytes-uplink-per-client",
    "train/bytes-uplink-total",
    "bytes/downlink-per-client",
    "bytes/downlink-total",
]
