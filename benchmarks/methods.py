"""Methods with a client half against FedAvg, over seeds: drift correction (SCAFFOLD) and personalization.

    .venv/bin/python benchmarks/methods.py --study drift [--seeds 0,1,2] [--rounds 10] [--clients 10] \
        [--alpha 0.1] [--run-config "model='fedmm-tiny-vit' ..."]
    .venv/bin/python benchmarks/methods.py --study personal [...]

drift: per seed, the centralized reference (benchmarks/strategies.py's, on
the clients' pooled data) sets the target, 95% of its final accuracy; then
FedAvg, FedProx (mu 0.01) and SCAFFOLD, all with plain SGD at ``--sgd-lr``
(SCAFFOLD's option-II control variate assumes it), run in Flower's
simulation at Dirichlet ``--alpha``. Per row: final central zero-shot
accuracy, rounds to the target, uplink bytes per client-round; mean and
standard deviation over the seeds.

personal: FedAvg's global adapter, Ditto (lam 0.1), local heads and
local-only training (Ditto with lam 0: each personal adapter trains on its
client's data alone from the same start), each evaluated on every client's
own held-out split after the last round (fraction-evaluate 1): the mean
over clients (weighted by examples) and the worst client; and the global
adapter's accuracy on the server's split.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

from jobs import prepare, run_job

# benchmarks/strategies.py's centralized reference, loaded under its own name: "strategies" is the project's package
_spec = importlib.util.spec_from_file_location("strategies_benchmark", Path(__file__).with_name("strategies.py"))
assert _spec is not None and _spec.loader is not None
_strategies_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_strategies_benchmark)
references = _strategies_benchmark.references

DRIFT = {
    "fedavg (sgd)": {"strategy": "fedavg"},
    "fedprox (sgd, mu 0.01)": {"strategy": "fedprox", "proximal-mu": 0.01},
    "scaffold (sgd)": {"strategy": "scaffold"},
}
PERSONAL = {
    "fedavg (global)": ({"strategy": "fedavg"}, ""),
    "ditto (lam 0.1)": ({"strategy": "ditto", "strategy-args": "lam=0.1"}, "personal-"),
    "local heads": ({"strategy": "local-heads"}, "personal-"),
    "local-only": ({"strategy": "ditto", "strategy-args": "lam=0.0"}, "personal-"),
}


def spread(values: list[float], fmt: str = "{:.1%}") -> str:
    """mean ± standard deviation over the seeds (each seed's value in brackets)."""
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def drift(args, common: dict, work) -> None:
    from fedmm.config import Settings

    results: dict[str, dict[str, list[float]]] = {name: {"final": [], "rounds": [], "bytes": [], "never": [],
                                                        "to-fedavg": []} for name in ["centralized", *DRIFT]}
    for seed in args.seeds:
        config = {**common, "seed": seed, "partitioner": "dirichlet", "dirichlet-alpha": args.alpha}
        curve, _ = references(Settings.from_run_config(config), args.clients, args.rounds, args.rounds,
                              ["centralized"])["centralized"]
        central = curve[max(curve)]
        results["centralized"]["final"].append(central)
        target = 0.95 * central
        fedavg_final = None  # SCAFFOLD's claim: fewer rounds than FedAvg to reach FedAvg's final accuracy
        for name, row in DRIFT.items():
            job = f"drift-{seed}-{row['strategy']}"
            report, _ = run_job(job, {**config, **row, "local-optimizer": "sgd", "lr": args.sgd_lr},
                                args.clients, work)
            acc = {r: v["central/zs-acc"] for r, v in report["rounds"].items()}
            hit = next((r for r in sorted(acc) if r > 0 and acc[r] >= target), None)
            results[name]["final"].append(acc[max(acc)])
            (results[name]["rounds"] if hit else results[name]["never"]).append(hit or 1)
            rounds = [v for r, v in report["rounds"].items() if r > 0]
            results[name]["bytes"].append(statistics.mean(v["train/bytes-uplink-per-client"] for v in rounds))
            fedavg_final = acc[max(acc)] if fedavg_final is None else fedavg_final
            reach = next((r for r in sorted(acc) if r > 0 and acc[r] >= fedavg_final), None)
            results[name]["to-fedavg"].append(reach if reach is not None else float("nan"))
            print(f"seed {seed} {name}: final {acc[max(acc)]:.2%}, target {target:.2%} reached at round {hit}",
                  flush=True)
    print("\n| run | final zs-acc | rounds to 95% of centralized | rounds to FedAvg's final accuracy (per seed) "
          "| uplink bytes per client-round |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        reached = f"{spread(r['rounds'], '{:.1f}')} ({len(r['rounds'])} of {len(args.seeds)} seeds)" \
            if name != "centralized" else ""
        to_fedavg = ", ".join("—" if v != v else str(int(v)) for v in r["to-fedavg"])
        size = spread(r["bytes"], "{:,.0f}") if r["bytes"] else ""
        print(f"| {name} | {spread(r['final'])} | {reached} | {to_fedavg} | {size} |")


def personal(args, common: dict, work) -> None:
    results: dict[str, dict[str, list[float]]] = {name: {"mean": [], "worst": [], "server": []} for name in PERSONAL}
    for seed in args.seeds:
        config = {**common, "seed": seed, "partitioner": "dirichlet", "dirichlet-alpha": args.alpha,
                  "fraction-evaluate": 1.0}
        for name, (row, prefix) in PERSONAL.items():
            job = f"personal-{seed}-{name.split()[0]}-{row.get('strategy-args', '').replace('=', '')}"
            report, _ = run_job(job, {**config, **row}, args.clients, work)
            last = report["rounds"][max(report["rounds"])]
            results[name]["mean"].append(last[f"evaluate/{prefix}zs-acc"])
            results[name]["worst"].append(last[f"evaluate/{prefix}client-acc-min"])
            results[name]["server"].append(last["central/zs-acc"])
            print(f"seed {seed} {name}: clients' mean {last[f'evaluate/{prefix}zs-acc']:.2%}, worst "
                  f"{last[f'evaluate/{prefix}client-acc-min']:.2%}, server split {last['central/zs-acc']:.2%}",
                  flush=True)
    print("\n| model evaluated | clients' held-out: mean | worst client | server's split (global adapter) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {spread(r['mean'])} | {spread(r['worst'])} | {spread(r['server'])} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=["drift", "personal"], required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--sgd-lr", type=float, default=0.1, help="drift: the clients' plain-SGD step")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    common, _, work = prepare(args.run_config, args.rounds, f"methods-{args.study}")
    (drift if args.study == "drift" else personal)(args, common, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
