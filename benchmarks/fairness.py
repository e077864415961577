"""Fairness and toxicity benchmark: unconstrained vs constrained training on the default task.

    .venv/bin/python benchmarks/fairness.py [--model effnet-lite0-minilm] [--clients 10]
        [--settings unconstrained,constrained,qfedavg] [--run-config "k=v ..."]
        [--constraint-config "dual-step-group-gap=20.0 ..."] [--keep DIR [--reuse]]

Each setting is one job in Flower's simulation engine (the default job plus its overrides):

- unconstrained: the default job (constraints measured, not enforced);
- constrained: constraints = group-gap,toxicity with the run config's thresholds and steps;
- qfedavg: Flower's QFedAvg (q-FFL), the client-fairness option, no group constraints.

Reports overall zero-shot accuracy, group accuracy gap, worst-group accuracy, toxic top-1 retrieval
rate (server held-out split, its toxic captions as distractors), the final multipliers, and the
issue's goals: gap cut >= 50% at <= 2 points accuracy cost; toxic top-1 <= 1%. Prints markdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import load_report, run_job  # noqa: E402  (this folder is on sys.path when a benchmark runs)

SETTINGS = {
    "unconstrained": {},
    "constrained": {"constraints": "group-gap,toxicity"},
    "qfedavg": {"strategy": "qfedavg", "local-optimizer": "sgd", "lr": 0.1},  # its L = 1/lr needs SGD clients
}
COLUMNS = ("central/zs-acc", "central/acc-gap", "central/worst-group-acc", "central/eo-gap", "central/toxic-top1",
           "central/toxic-mass", "evaluate/acc-gap", "evaluate/client-acc-min")


def run_one(name: str, overrides: dict, clients: int, work: Path, reuse: bool = False) -> dict:
    done = work / name / "report" / "metrics.json"
    if reuse and done.is_file():  # a setting measured before into the same --keep folder
        data, wall = load_report(done), float("nan")
        differ = {k: (data["config"].get(k), v) for k, v in overrides.items() if data["config"].get(k) != v}
        if differ:
            raise SystemExit(f"{name}: the kept report was run with other values: {differ}")
        print(f"{name}: reusing {done}", flush=True)
    else:
        data, wall = run_job(name, overrides, clients, work)
    return {"name": name, "rounds": data["rounds"], "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="effnet-lite0-minilm")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--settings", default="unconstrained,constrained")
    parser.add_argument("--run-config", default="", help="overrides for every setting, k=v ...")
    parser.add_argument("--constraint-config", default="", help="overrides for the constrained setting only, k=v ...")
    parser.add_argument("--keep", default="", help="keep the reports under this folder")
    parser.add_argument("--reuse", action="store_true", help="reuse reports already under --keep (same overrides)")
    args = parser.parse_args()
    from fedmm.config.text import parse_run_config

    extra = {"model": args.model, **(parse_run_config(args.run_config) if args.run_config else {})}
    names = [n for n in args.settings.split(",") if n]
    if args.constraint_config:
        SETTINGS["constrained"] = {**SETTINGS["constrained"], **parse_run_config(args.constraint_config)}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedmm-fairness-"))
    results = []
    for name in names:
        r = run_one(name, {**extra, **SETTINGS[name]}, args.clients, work, args.reuse)
        last = r["rounds"][max(r["rounds"])]
        print(f"{name}: " + " ".join(f"{k}={last.get(k, float('nan')):.4f}" for k in COLUMNS)
              + f" ({r['wall']:.0f} s)", flush=True)
        results.append(r)
    base = results[0]["rounds"][0]
    print(f"\nmodel {args.model}, {args.clients} clients, {max(results[0]['rounds'])} rounds, overrides "
          f"{args.run_config or 'none'}, constrained: {SETTINGS['constrained']}; base (round 0): zs-acc {base['central/zs-acc']:.4f}, "
          f"acc-gap {base['central/acc-gap']:.4f}, toxic-top1 {base['central/toxic-top1']:.4f}\n")
    print("| setting | " + " | ".join(c.replace("central/", "") for c in COLUMNS)
          + " | multipliers (final) | round time (s) |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for r in results:
        last = r["rounds"][max(r["rounds"])]
        mult = ", ".join(f"{k.removeprefix('constraints/multiplier-')} {v:.2f}" for k, v in last.items()
                         if k.startswith("constraints/multiplier-")) or "-"
        secs = sorted(row["round-seconds"] for rnd, row in r["rounds"].items() if rnd > 0 and "round-seconds" in row)
        print(f"| {r['name']} | " + " | ".join(f"{last.get(c, float('nan')):.4f}" for c in COLUMNS)
              + f" | {mult} | {secs[len(secs) // 2]:.1f} |")
    if {"unconstrained", "constrained"} <= set(names):
        u = results[names.index("unconstrained")]["rounds"]
        c = results[names.index("constrained")]["rounds"]
        u, c = u[max(u)], c[max(c)]
        cut = 1 - c["central/acc-gap"] / u["central/acc-gap"] if u["central/acc-gap"] > 0 else float("nan")
        cost = 100 * (u["central/zs-acc"] - c["central/zs-acc"])
        print(f"\ngoals: group accuracy gap cut by {100 * cut:.0f}% (goal >= 50%) at {cost:.2f} points of accuracy "
              f"(goal <= 2); toxic top-1 {100 * c['central/toxic-top1']:.2f}% (goal <= 1%)")
    print(f"\nreports: {work}")


if __name__ == "__main__":
    main()
