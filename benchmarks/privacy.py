"""Privacy benchmarks: DP step-time ratio and memory; accuracy at epsilon 1, 3, 8, infinity.

    # per-step time and peak memory: non-private vs DP-SGD (hooks, ghost), one subprocess per mode
    .venv/bin/python benchmarks/privacy.py step [--model effnet-lite0-minilm] [--steps 12] [--repeats 3]

    # the default job under each privacy setting, in Flower's simulation engine
    .venv/bin/python benchmarks/privacy.py accuracy [--model effnet-lite0-minilm] [--clients 10]
        [--epsilons 1,3,8] [--levels dp-sgd,central-server,distributed-16] [--client-level-epsilons 8]

Calibration. DP-SGD: each client's epsilon depends on its sampling rate q = 1/ceil(n/batch);
the noise multiplier is set so that the *median* client spends exactly the target epsilon in
num-server-rounds * local-steps steps, and max-epsilon = target stops clients with a higher q
(smaller data) early: no client ever exceeds the target. Client level: the noise multiplier
whose num-server-rounds Gaussian releases cost exactly the target (Flower's accountant, no
amplification claimed). distributed-<bits>: distributed DP under secure aggregation in a
<bits>-bit ring with t = the cohort (DDGauss's setting: each client adds 1/n of the noise, no
planned dropout), its noise multiplier the smallest whose Skellam ledger spends the target over
the run. Prints markdown rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import adapter_dim, distributed_sigma, run_job  # noqa: E402  (this folder is on sys.path when a benchmark runs)
from fedmm.config import Settings  # noqa: E402


def _step_worker(model: str, mode: str, steps: int, repeats: int) -> None:
    """One mode in this process: median seconds per step, peak RSS. Prints JSON."""
    import torch

    from fedmm import lora
    from fedmm import model as models
    from fedmm.data import load_splits, to_batch
    from fedmm.pretrain import load_base_model
    from fedmm.privacy import PublicNegativesLoss, train_dp_sgd
    from fedmm.train import train_steps

    torch.set_num_threads(2)
    s = Settings.from_run_config({"model": model})
    base = load_base_model(s, progress=False)
    net = lora.attach_lora(base, s.lora_rank, s.lora_alpha, s.lora_target_list)
    tok = models.create_tokenizer(s.model)
    pre = models.image_mean_std(base)
    splits = load_splits(s.dataset)
    public = to_batch(splits["public"].select(range(min(len(splits["public"]), 4 * s.dp_negatives))), tok, *pre)
    data = to_batch(splits["clients"].select(range(160)), tok, *pre)  # q = 0.2 at batch 32
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):  # the first repeat warms up
        if mode == "non-private":
            st = train_steps(net, data, steps=steps, batch_size=s.batch_size, lr=s.lr, loss_fn=PublicNegativesLoss(net, public, s.dp_negatives))
        elif mode == "non-private-cliploss":
            st = train_steps(net, data, steps=steps, batch_size=s.batch_size, lr=s.lr)
        else:
            st, _ = train_dp_sgd(net, data, PublicNegativesLoss(net, public, s.dp_negatives), steps=steps, batch_size=s.batch_size, lr=s.lr,
                                 noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
        times.append(st.seconds / steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "step": statistics.median(times[1:]), "rss-mib": rss / 1024,
                      "train-rss-mib": (rss - rss0) / 1024}))


def step_benchmark(model: str, steps: int, repeats: int) -> None:
    rows = []
    for mode in ("non-private-cliploss", "non-private", "hooks", "ghost"):
        out = subprocess.run([sys.executable, __file__, "_step", "--model", model, "--mode", mode,
                              "--steps", str(steps), "--repeats", str(repeats)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next(r for r in rows if r["mode"] == "non-private")["step"]
    print(f"\nmodel {model}, batch 32 (Poisson, q = 0.2 under DP), {steps} steps x {repeats} repeats\n")
    print("| mode | median step (s) | ratio to non-private (same loss) | peak RSS (MiB) | RSS growth in training (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['step']:.3f} | {r['step'] / ref:.2f}x | {r['rss-mib']:.0f} | {r['train-rss-mib']:.0f} |")


def client_sizes(settings: Settings, clients: int) -> list[int]:
    from fedmm.data import load_splits, train_sizes

    return train_sizes(settings, load_splits(settings.dataset)["clients"], clients)


def calibrate(settings: Settings, level: str, epsilon: float, clients: int) -> dict:
    from opacus.accountants.utils import get_noise_multiplier

    from fedmm.privacy import sample_rate

    rounds, delta = settings.num_server_rounds, settings.dp_delta
    if level.startswith("distributed-"):
        bits = int(level.split("-")[1])
        sigma = distributed_sigma(epsilon, clients, bits, clients, settings, adapter_dim(settings))
        return {"dp": "distributed", "secure-aggregation": True, "secagg-bits": bits, "secagg-threshold": clients,
                "secagg-dropout": 0.0, "dp-noise-multiplier": float(sigma), "max-epsilon": float(epsilon)}
    if level == "dp-sgd":
        q = statistics.median(sample_rate(n, settings.batch_size) for n in client_sizes(settings, clients))
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                     steps=rounds * settings.local_steps, accountant="rdp", epsilon_tolerance=0.005)
    else:
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=rounds,
                                     accountant="rdp", epsilon_tolerance=0.005)
    return {"dp": level, "dp-noise-multiplier": float(sigma), "max-epsilon": float(epsilon)}


def run_one(name: str, overrides: dict, clients: int, work: Path) -> dict:
    data, wall = run_job(name, overrides, clients, work)
    rounds = data["rounds"]
    last = rounds[max(rounds)]
    eps = last.get("privacy/epsilon", max((r.get("train/dp-epsilon-max", 0.0) for r in rounds.values()), default=0.0))
    declined = sum(1 for f in data["extra"].get("failed-replies", []) if "budget" in f["reason"])
    return {"name": name, "acc": last["central/zs-acc"], "base": rounds[0]["central/zs-acc"], "epsilon": eps,
            "declined": declined, "wall": wall, "rounds": max(rounds)}


def accuracy_benchmark(model: str, clients: int, epsilons: list[float], levels: list[str], extra: dict,
                       client_level_epsilons: list[float] | None = None, references: bool = True,
                       clip_reference: float | None = None) -> None:
    base = {"model": model, **extra}
    settings = Settings.from_run_config(base)
    plan: list[tuple[str, dict]] = [
        ("non-private, ClipLoss (the default job)", {}),
        ("non-private, public negatives (DP-SGD's objective, eps = inf)", {"loss": "public-negatives"}),
    ] if references else []
    if references and clip_reference is not None:  # measured before with the same code path: not re-run
        plan = plan[1:]
    runs = [(level, eps) for level in levels
            for eps in (epsilons if level == "dp-sgd" or client_level_epsilons is None else client_level_epsilons)]
    runs.sort(key=lambda r: -r[1])  # largest epsilon first: the most informative runs come first
    for level, eps in runs:
        cal = calibrate(settings, level, eps, clients)
        name = f"{level} bits" if level.startswith("distributed-") else level
        plan.append((f"{name}, eps {eps:g} (sigma {cal['dp-noise-multiplier']:.3f})", cal))
    with tempfile.TemporaryDirectory(prefix="fedmm-privacy-") as tmp:
        results = []
        for i, (name, overrides) in enumerate(plan):
            r = run_one(f"run{i}", {**base, **overrides}, clients, Path(tmp))
            r["name"] = name
            results.append(r)
            print(f"{name}: acc {r['acc']:.4f} eps {r['epsilon']:.3f} declined {r['declined']} "
                  f"({r['wall']:.0f} s)", flush=True)
    nan = float("nan")
    if references and clip_reference is not None:
        results.insert(0, {"name": "non-private, ClipLoss (the default job; --clip-reference)", "acc": clip_reference,
                           "base": results[0]["base"], "epsilon": 0.0, "declined": 0})
    ref = {"clip": results[0]["acc"], "public": results[1]["acc"]} if references else {"clip": nan, "public": nan}
    print(f"\nmodel {model}, {clients} clients, {settings.num_server_rounds} rounds, delta {settings.dp_delta:g}; "
          f"base (round 0) zs-acc {results[0]['base']:.4f}\n")
    print("| setting | final zs-acc | % of non-private (same loss) | epsilon spent (worst client / server ledger) "
          "| client-rounds declined (budget) |")
    print("|---|---|---|---|---|")
    for r in results:
        same = ref["public"] if ("dp-sgd" in r["name"] or "public" in r["name"]) else ref["clip"]
        eps = "inf" if "non-private" in r["name"] else f"{r['epsilon']:.2f}"
        print(f"| {r['name']} | {r['acc']:.4f} | {100 * r['acc'] / same:.0f}% | {eps} | {r['declined']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("step")
    p.add_argument("--model", default="effnet-lite0-minilm")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    w = sub.add_parser("_step")
    w.add_argument("--model")
    w.add_argument("--mode")
    w.add_argument("--steps", type=int)
    w.add_argument("--repeats", type=int)
    a = sub.add_parser("accuracy")
    a.add_argument("--model", default="effnet-lite0-minilm")
    a.add_argument("--clients", type=int, default=10)
    a.add_argument("--epsilons", default="1,3,8")
    a.add_argument("--levels", default="dp-sgd,central-server")
    a.add_argument("--client-level-epsilons", default="", help="epsilons for client-level DP (default: --epsilons)")
    a.add_argument("--run-config", default="", help="extra run-config overrides, k=v ...")
    a.add_argument("--no-references", action="store_true", help="skip the two non-private runs")
    a.add_argument("--clip-reference", type=float, default=None,
                   help="final accuracy of the default (ClipLoss) job measured before: skips that run")
    args = parser.parse_args()
    if args.cmd == "step":
        step_benchmark(args.model, args.steps, args.repeats)
    elif args.cmd == "_step":
        _step_worker(args.model, args.mode, args.steps, args.repeats)
    else:
        from fedmm.config.text import parse_run_config

        extra = parse_run_config(args.run_config) if args.run_config else {}
        accuracy_benchmark(args.model, args.clients, [float(e) for e in args.epsilons.split(",")],
                           [lv for lv in args.levels.split(",") if lv], extra,
                           [float(e) for e in args.client_level_epsilons.split(",")] if args.client_level_epsilons else None,
                           references=not args.no_references, clip_reference=args.clip_reference)


if __name__ == "__main__":
    main()
