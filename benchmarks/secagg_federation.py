"""Secure aggregation in whole jobs, side by side in one invocation (Flower's simulation engine).

    .venv/bin/python benchmarks/secagg_federation.py [--clients 10] [--rounds 3] [--run-config "k=v ..."]
        [--rows accuracy,privacy] [--noise 0.5] [--bits 12,16,20] [--strategies fedavg,fedadam]
        [--thresholds 0,10] [--vanish 0.3] [--match-epsilon] [--repeats 1] [--first-seed 0]

accuracy  FedAvg and FedAdam, plaintext vs secure aggregation, with --vanish of the clients gone every
          round: plaintext rows lose them at training (`crash`), secure rows after training, at the mask
          stage (`vanish-mask`: the plan's `secagg-dropout` is set to it); the fault picks the same
          clients either way, so both sum the same updates and should end at the same accuracy
          (stochastic rounding is the only difference).
privacy   the same job under central DP (`central-server`) and under distributed DP (Skellam shares
          under secure aggregation) at each ring width in --bits, at one noise multiplier: epsilon from
          each run's own ledger, final accuracy; --thresholds repeats them per secagg-threshold (each
          client adds 1/t of the noise: t = the cohort is DDGauss's and Skellam's setting, no dropout,
          so those rows plan `secagg-dropout = 0`). --match-epsilon: each distributed row's noise
          multiplier is the smallest whose Skellam epsilon after the run's rounds is at most the
          central row's (the same epsilon, as the Skellam bound charges integers a little more).
--repeats runs every row with run-config seeds S..S+N-1 (S: --first-seed, so a later invocation can add
seeds) and prints each row's median and its runs.

Round seconds: the median of rounds 2+ (round 1 includes warm-up). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import adapter_dim, distributed_sigma, prepare, run_job  # noqa: E402  (this folder is on sys.path when a benchmark runs)


def _row(name: str, report: dict, rounds: int) -> dict:
    r = report["rounds"]
    later = [r[i]["round-seconds"] for i in range(2, rounds + 1) if "round-seconds" in r[i]]
    return {"name": name, "acc": r[rounds].get("central/zs-acc", float("nan")),
            "round": statistics.median(later) if later else float("nan"),
            "epsilon": r[rounds].get("privacy/epsilon"),
            "contributors": r[rounds].get("secagg/contributors", r[rounds].get("train/num-replies")),
            "uplink": r[rounds].get("train/bytes-uplink-per-client", float("nan"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--run-config", default="")
    p.add_argument("--rows", default="accuracy,privacy")
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--bits", default="12,16,20")
    p.add_argument("--strategies", default="fedavg,fedadam", help="the accuracy rows' strategies")
    p.add_argument("--thresholds", default="0", help="secagg-threshold of the distributed rows (0: default)")
    p.add_argument("--vanish", type=float, default=0.3, help="the accuracy rows' fraction of clients gone")
    p.add_argument("--match-epsilon", action="store_true", help="distributed rows at the central row's epsilon")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    args = p.parse_args()
    base, settings, work = prepare(args.run_config, args.rounds, "secagg")
    jobs: list[tuple[str, dict]] = []
    if "accuracy" in args.rows:
        for strategy in args.strategies.split(","):
            jobs.append((f"{strategy} plaintext", {"strategy": strategy, "inject-faults": f"crash={args.vanish}"}))
            jobs.append((f"{strategy} secure", {"strategy": strategy, "inject-faults": f"vanish-mask={args.vanish}",
                                                "secure-aggregation": True, "secagg-dropout": args.vanish}))
    central = ("central-server", {"dp-noise-multiplier": args.noise, "dp": "central-server"})
    distributed = []
    if "privacy" in args.rows:
        jobs.append(central)
        for threshold in (int(t) for t in args.thresholds.split(",")):
            for bits in (int(b) for b in args.bits.split(",")):
                name = f"distributed, {bits} bits" + (f", t = {threshold}" if threshold else "")
                distributed.append((name, bits, threshold))
    dim = adapter_dim(settings) if args.match_epsilon and distributed else 0
    runs: dict[str, list[dict]] = {}
    seeds = range(args.first_seed, args.first_seed + args.repeats)
    for seed in seeds:
        central_epsilon = None
        for name, overrides in jobs + [(d[0], {}) for d in distributed]:
            spec = next((d for d in distributed if d[0] == name), None)
            if spec is not None:
                _, bits, threshold = spec
                sigma = args.noise
                if args.match_epsilon and central_epsilon is not None:
                    sigma = distributed_sigma(central_epsilon, args.clients, bits, threshold, settings, dim)
                overrides = {"dp-noise-multiplier": sigma, "dp": "distributed", "secure-aggregation": True,
                             "secagg-bits": bits, "secagg-threshold": threshold,
                             "secagg-dropout": 0.0 if threshold else settings.secagg_dropout}
            tag = f"{name}-seed{seed}".replace(" ", "-").replace(",", "").replace("=", "")
            report, wall = run_job(tag, {**base, **overrides, "seed": seed}, args.clients, work)
            row = _row(name, report, args.rounds)
            row["sigma"] = overrides.get("dp-noise-multiplier")
            if name == "central-server":
                central_epsilon = row["epsilon"]
            runs.setdefault(name, []).append(row)
            print(f"{name} (seed {seed}): {wall:.0f} s, {100 * row['acc']:.2f}%", file=sys.stderr, flush=True)
    print(f"{args.clients} clients, {args.rounds} rounds, run config {args.run_config!r}, seeds {seeds[0]}..{seeds[-1]}\n")
    print("| job | final zs-acc (median) | runs | round s (median, rounds 2+) | contributors | uplink bytes/client "
          "| sigma | epsilon |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        acc = statistics.median(r["acc"] for r in rows)
        each = ", ".join(f"{100 * r['acc']:.2f}" for r in rows)
        eps = f"{rows[0]['epsilon']:.3f}" if rows[0]["epsilon"] is not None else "-"
        sigma = f"{rows[0]['sigma']:.4g}" if rows[0]["sigma"] is not None else "-"
        print(f"| {name} | {100 * acc:.2f}% | {each} | {statistics.median(r['round'] for r in rows):.1f} | "
              f"{rows[0]['contributors']} | {rows[0]['uplink']:.0f} | {sigma} | {eps} |")


if __name__ == "__main__":
    main()
