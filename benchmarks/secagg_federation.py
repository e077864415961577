"""Secure aggregation in whole jobs, side by side in one invocation (Flower's simulation engine).

    .venv/bin/python benchmarks/secagg_federation.py [--clients 10] [--rounds 3] [--run-config "k=v ..."]
        [--rows accuracy,privacy] [--noise 0.5] [--bits 12,16,20] [--strategies fedavg,fedadam]
        [--thresholds 0,10]

accuracy  FedAvg and FedAdam, plaintext vs secure aggregation, with 30% of the clients gone every round:
          plaintext rows lose them at training (`crash=0.3`), secure rows after training, at the mask
          stage (`vanish-mask=0.3`); the fault picks the same clients either way, so both sum the same 7
          updates and should end at the same accuracy (stochastic rounding is the only difference).
privacy   the same job under central DP (`central-server`) and under distributed DP (Skellam shares
          under secure aggregation) at each ring width in --bits, at one noise multiplier: epsilon from
          each run's own ledger, final accuracy; --thresholds repeats them per secagg-threshold (each
          client adds 1/t of the noise: t = the cohort is DDGauss's and Skellam's setting, no dropout).

Round seconds: the median of rounds 2+ (round 1 includes warm-up). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import prepare, run_job  # noqa: E402  (this folder is on sys.path when a benchmark runs)


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
    args = p.parse_args()
    base, _, work = prepare(args.run_config, args.rounds, "secagg")
    jobs: list[tuple[str, dict]] = []
    if "accuracy" in args.rows:
        for strategy in args.strategies.split(","):
            jobs.append((f"{strategy} plaintext", {"strategy": strategy, "inject-faults": "crash=0.3"}))
            jobs.append((f"{strategy} secure", {"strategy": strategy, "inject-faults": "vanish-mask=0.3",
                                                "secure-aggregation": True}))
    if "privacy" in args.rows:
        dp = {"dp-noise-multiplier": args.noise}
        jobs.append(("central-server", {**dp, "dp": "central-server"}))
        for threshold in (int(t) for t in args.thresholds.split(",")):
            for bits in (int(b) for b in args.bits.split(",")):
                name = f"distributed, {bits} bits" + (f", t = {threshold}" if threshold else "")
                jobs.append((name, {**dp, "dp": "distributed", "secure-aggregation": True, "secagg-bits": bits,
                                    "secagg-threshold": threshold}))
    rows = []
    for name, overrides in jobs:
        report, wall = run_job(name.replace(" ", "-").replace(",", "").replace("=", ""), {**base, **overrides}, args.clients, work)
        rows.append(_row(name, report, args.rounds))
        print(f"{name}: {wall:.0f} s", file=sys.stderr, flush=True)
    print(f"{args.clients} clients, {args.rounds} rounds, run config {args.run_config!r}\n")
    print("| job | final zs-acc | round s (median, rounds 2+) | contributors | uplink bytes/client | epsilon |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        eps = f"{r['epsilon']:.3f}" if r["epsilon"] is not None else "-"
        print(f"| {r['name']} | {100 * r['acc']:.2f}% | {r['round']:.1f} | {r['contributors']} | "
              f"{r['uplink']:.0f} | {eps} |")


if __name__ == "__main__":
    main()
