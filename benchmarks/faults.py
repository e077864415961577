"""Faults benchmark: accuracy with crashing clients, and FedAvg vs robust rules under Byzantine clients.

    .venv/bin/python benchmarks/faults.py [--clients 10] [--rounds 10] [--suites crash,byzantine]
        [--byzantine noise=0.2] [--seeds 0] [--run-config "k=v ..."]

Every row is one job in Flower's simulation engine with injected faults
(``inject-faults``, fedmm/faults.py; the picks are seeded, so every row of a
suite sees the same misbehaving clients):

- crash: 0, 10 and 30% of the clients crash in each training round (drawn
  again each round). Goal: every round completes; final accuracy within 1
  point of the fault-free row at 30%.
- byzantine: 20% of the clients (the same ones every round) send a
  Byzantine update. Rows: FedAvg clean; FedAvg, FedMedian, FedTrimmedAvg,
  Krum and Bulyan with the attack and fedmm's norm filter off
  (``max-update-norm-ratio=0``: the rules alone); FedAvg with the attack and
  the default norm filter. Goal: robust rules within 3 points of clean,
  FedAvg alone shown to degrade.

Prints markdown tables: final and best central zero-shot accuracy, and per
round the failed / dropped / missing replies summed over the run. With
several ``--seeds`` (e.g. 0,1,2: data partition, LoRA init, batches and
fault picks all change) each row runs once per seed and the table shows the
mean, with every seed's final accuracy beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs import prepare, run_job  # noqa: E402  (this folder is on sys.path when a benchmark runs)


def suite_rows(suite: str, clients: int, byzantine: str) -> list[tuple[str, dict]]:
    if suite == "crash":
        return [(f"crash {p}%", {"inject-faults": f"crash={p / 100}" if p else ""}) for p in (0, 10, 30)]
    f = max(1, round(0.2 * clients))
    off = {"inject-faults": byzantine, "max-update-norm-ratio": 0.0}
    return [
        ("fedavg, clean", {}),
        ("fedavg, attacked", off),
        ("fedmedian, attacked", {**off, "strategy": "fedmedian"}),
        ("fedtrimmedavg, attacked", {**off, "strategy": "fedtrimmedavg", "strategy-args": "beta=0.2"}),
        ("krum, attacked", {**off, "strategy": "krum", "strategy-args": f"num_malicious_nodes={f}"}),
        ("bulyan, attacked", {**off, "strategy": "bulyan",
                              "strategy-args": f"num_malicious_nodes={min(f, (clients - 3) // 4)}"}),
        ("fedavg + norm filter, attacked", {"inject-faults": byzantine}),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--suites", default="crash,byzantine")
    parser.add_argument("--byzantine", default="noise=0.2", help="inject-faults of the byzantine suite")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds; rows show the mean")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()

    from fedmm.config import Settings

    base, _, work = prepare(args.run_config, args.rounds, "faults")
    for suite in args.suites.split(","):
        rows = []
        seeds = [int(x) for x in args.seeds.split(",")]
        for name, overrides in suite_rows(suite, args.clients, args.byzantine):
            Settings.from_run_config({**base, **overrides})  # a bad row fails before any job runs
            per_seed = []
            for seed in seeds:
                job = name.replace(" ", "_").replace(",", "").replace("%", "pct").replace("+", "and") + f"-seed{seed}"
                report, wall = run_job(job, {**base, **overrides, "seed": seed}, args.clients, work)
                rounds = report["rounds"]
                done = [r for r in rounds if r > 0]
                acc = [rounds[r]["central/zs-acc"] for r in done]
                totals = {k: sum(rounds[r].get(k, 0.0) for r in done)
                          for k in ("failed-replies", "dropped-updates", "validation/dropped-updates", "missing-replies")}
                per_seed.append((len(done), acc[-1], max(acc), totals, wall))
                print(f"{name}, seed {seed}: {len(done)} rounds, final zs-acc {acc[-1]:.4f}, {totals}, {wall:.0f} s",
                      flush=True)
            rows.append((name, per_seed))
        print(f"\n### {suite} ({args.clients} clients, {args.rounds} rounds, seeds {args.seeds})\n")
        print("| run | rounds done | final zs-acc (mean) | per seed | best zs-acc (mean) | failed | dropped (decode) "
              "| dropped (norm) | missing | wall (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, per_seed in rows:
            mean = lambda i: sum(r[i] for r in per_seed) / len(per_seed)  # noqa: E731
            t = {k: sum(r[3][k] for r in per_seed) for k in per_seed[0][3]}
            finals = " / ".join(f"{r[1]:.2%}" for r in per_seed)
            print(f"| {name} | {min(r[0] for r in per_seed)} | {mean(1):.2%} | {finals} | {mean(2):.2%} "
                  f"| {t['failed-replies']:.0f} | {t['dropped-updates']:.0f} | {t['validation/dropped-updates']:.0f} "
                  f"| {t['missing-replies']:.0f} | {sum(r[4] for r in per_seed):.0f} |")
    print(f"\nresults: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
