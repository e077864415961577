"""An experiment's comparison: per grid point, the runs' final metrics as mean ± 95% confidence interval over seeds.

Reads each finished run's report (``metrics.json``, ``run.json``) and writes
into the experiment folder:

- ``runs.csv``: one row per run (point, seed, final metrics with the central
  audit's, rounds and server seconds (summed ``round-seconds``) to the target, uplink bytes,
  replies that failed or never came, epsilon, wall time);
- ``table.md`` (headed by how many of the experiment's runs finished: a
  stopped experiment's table is of those) and ``table.csv``: per point, each column's mean ± the
  half-width of Student's t 95% interval over the seeds
  (``scipy.stats.t.interval``; one seed: no interval), and the seeds' count;
  a column some of whose runs have no value (a target they never reached)
  says over how many it is taken, "(2 of 3)", so a point whose worst seed
  missed the target does not read as if all of them got there;
- ``plots/``: each central and evaluate accuracy and loss, and the central
  audit's robust accuracies, against round, the mean with its 95% band per point; accuracy against cumulative uplink
  bytes; accuracy against epsilon where the runs spent any.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .experiment import Experiment, finished_run, run_folder
from .protocol import AUDIT_SCALARS

ACCURACY = "central/zs-acc"
# the audit on the server's split: one held-out set for every run, so comparable across points
CENTRAL_AUDIT = tuple(f"central/{key}" for key in AUDIT_SCALARS)
CURVES = ("central/zs-acc", "central/loss", "evaluate/zs-acc", "evaluate/loss", "evaluate/personal-zs-acc",
          *(key for key in CENTRAL_AUDIT if "robust-acc" in key))
FINAL = ("central/zs-acc", "central/loss", "central/i2t-R@1", "central/t2i-R@1", "central/acc-gap", "evaluate/zs-acc",
         "evaluate/client-acc-min", "evaluate/personal-zs-acc", "evaluate/personal-client-acc-min", *CENTRAL_AUDIT)


def _epsilon(row: dict[str, Any]) -> float | None:
    for key in ("privacy/epsilon", "train/dp-epsilon-max"):
        if isinstance(row.get(key), (int, float)):
            return float(row[key])
    return None


def curves(exp: Experiment, out: Path) -> pd.DataFrame:
    """Every finished run's rounds: one row per (point, seed, round) with the curves' metrics and the cumulative
    uplink bytes."""
    rows = []
    for point, seed in exp.runs():
        found = finished_run(run_folder(out, point, seed))
        if found is None:
            continue
        uplink = 0.0
        for rnd, metrics in sorted(found[1].items()):
            uplink += float(metrics.get("train/bytes-uplink-total", 0.0))
            rows.append({"point": point.label, "seed": seed, "round": rnd, "uplink-bytes": uplink,
                         "epsilon": _epsilon(metrics), **{k: metrics.get(k) for k in CURVES}})
    return pd.DataFrame(rows)


def runs_table(exp: Experiment, out: Path) -> pd.DataFrame:
    """One row per finished run: its final metrics, rounds to the target, bytes, epsilon, wall time."""
    rows = []
    for point, seed in exp.runs():
        found = finished_run(run_folder(out, point, seed))
        if found is None:
            continue
        record, rounds = found
        last = rounds[max(rounds)]
        row: dict[str, Any] = {"point": point.label, "seed": seed, "rounds": max(rounds)}
        row.update({k: last[k] for k in FINAL if isinstance(last.get(k), (int, float))})
        if exp.target is not None:
            hit = next((r for r in sorted(rounds) if r > 0 and rounds[r].get(ACCURACY, 0.0) >= exp.target), None)
            row["rounds-to-target"] = float(hit) if hit is not None else math.nan
            # the server's clock to the target: what an asynchronous run is compared on (its rounds are shorter)
            row["seconds-to-target"] = math.nan if hit is None else \
                sum(float(rounds[r].get("round-seconds", math.nan)) for r in sorted(rounds) if 0 < r <= hit)
        row["uplink-bytes"] = sum(float(m.get("train/bytes-uplink-total", 0.0)) for m in rounds.values())
        # replies that crashed, declined or never came, over the run: a run whose clients all failed still
        # "finishes" (no reply can end a run), and this column is where the table says so
        row["failed-replies"] = sum(float(m.get(key, 0.0)) for m in rounds.values()
                                    for key in ("failed-replies", "missing-replies"))
        eps = _epsilon(last)
        if eps is not None:
            row["epsilon"] = eps
        wall = record.get("wall_seconds")
        row["wall-seconds"] = float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def interval(values: pd.Series) -> tuple[float, float]:
    """Mean and the half-width of Student's t 95% interval (NaN with fewer than two values)."""
    values = values.dropna().astype(float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan
    if values.nunique() == 1:  # identical seeds: no spread (the t-interval of a zero SEM)
        return mean, 0.0
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(high - low) / 2


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """Per point: each numeric column's mean and 95% half-width over the seeds, and the seeds' count."""
    rows = []
    for point, group in runs.groupby("point", sort=False):
        row: dict[str, Any] = {"point": point, "seeds": len(group)}
        for column in runs.columns:
            if column in ("point", "seed") or not pd.api.types.is_numeric_dtype(runs[column]):
                continue
            row[column], row[f"{column} ±95%"] = interval(group[column])
            row[f"{column} n"] = int(group[column].notna().sum())
        rows.append(row)
    return pd.DataFrame(rows)


WHOLE_NUMBERS = ("uplink-bytes", "wall-seconds", "seconds-to-target", "failed-replies")


def _cell(mean: float, half: float, column: str, have: int, seeds: int) -> str:
    if math.isnan(mean):  # none of the point's runs has a value (a target none reached)
        return f"— (0 of {seeds})"
    fmt = (lambda v: f"{v:.2%}") if any(k in column for k in ("acc", "R@1", "gap", "agreement")) else \
        (lambda v: f"{v:,.0f}") if column in WHOLE_NUMBERS else (lambda v: f"{v:.3g}")
    cell = fmt(mean) if math.isnan(half) else f"{fmt(mean)} ± {fmt(half)}"
    return cell if have == seeds else f"{cell} ({have} of {seeds})"


def markdown(table: pd.DataFrame) -> str:
    columns = [c for c in table.columns if c not in ("point", "seeds") and not c.endswith(("±95%", " n"))]
    lines = ["| point | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        seeds = int(row["seeds"])
        cells = [_cell(float(row[c]), float(row[f"{c} ±95%"]), c, int(row[f"{c} n"]), seeds) for c in columns]
        lines.append(f"| {row['point']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nmean ± half-width of the 95% t-interval over seeds (one seed: the value alone); "
                               "(k of n): over the k of the point's n runs that have a value, e.g. reached the "
                               "target\n")


def plots(data: pd.DataFrame, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def band(x: str, y: str, name: str, xlabel: str) -> None:
        frame = data.dropna(subset=[y, x]) if x in data and y in data else pd.DataFrame()
        if frame.empty:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for point, group in frame.groupby("point", sort=False):
            summary = group.groupby("round").agg(x=(x, "mean"), mean=(y, "mean"), sem=(y, "sem"), n=(y, "count"))
            half = np.array([interval(group[group["round"] == r][y])[1] for r in summary.index])
            ax.plot(summary["x"], summary["mean"], label=str(point))
            ok = ~np.isnan(half)
            ax.fill_between(summary["x"][ok], (summary["mean"] - half)[ok], (summary["mean"] + half)[ok], alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    for metric in CURVES:
        band("round", metric, metric.replace("/", "-"), "round")
    band("uplink-bytes", ACCURACY, "accuracy-vs-uplink-bytes", "cumulative uplink bytes")
    if "epsilon" in data and data["epsilon"].notna().any():
        band("epsilon", ACCURACY, "accuracy-vs-epsilon", "epsilon spent")
    return written


def write_comparison(exp: Experiment, out: Path) -> dict[str, Path]:
    """The experiment's table (markdown, CSV), its runs (CSV) and plots; their paths."""
    runs = runs_table(exp, out)
    if runs.empty:
        raise ValueError(f"experiment {exp.name}: no finished run in {out}")
    table = comparison(runs)
    paths = {"runs": out / "runs.csv", "table-csv": out / "table.csv", "table": out / "table.md"}
    runs.to_csv(paths["runs"], index=False)
    table.to_csv(paths["table-csv"], index=False)
    total = len(exp.runs())
    done = f"{len(runs)} of {total} runs finished" + ("" if len(runs) == total else
                                                      "; the others are not in this table")
    paths["table"].write_text(f"# Experiment {exp.name}\n\n{done}.\n\n" + markdown(table))
    for i, path in enumerate(plots(curves(exp, out), out / "plots")):
        paths[f"plot-{i}"] = path
    return paths
