"""Strategies on the default task: final accuracy and rounds-to-target, IID and Dirichlet α=0.1.

For each partitioning, two reference rows come first, trained here with the
client's code path (``train_steps`` on the adapter, AdamW, the run's rank, lr
and batch size) and evaluated once per round's worth of steps:

- centralized: one adapter on all clients' training data pooled, for the
  steps one client takes in the federation (rounds × local-steps; many epochs
  of the pooled data, a tenth of the federation's compute at 10 clients);
- local-only: each client alone on its own training data, for the same steps
  per round (``--local-rounds`` of them, default all); the mean over clients,
  round by round, final and best (the best is generous: a small client
  overfits, and no client could pick that round without the server's data);
- client-batches (a diagnostic, only with ``--rows``): centralized's single
  adapter and optimizer and its steps, but every batch drawn from one
  client's data (round-robin) — the batch composition a federation trains
  on, with no aggregation and no client drift. Under label skew in-batch
  contrastive negatives are mostly the same class; this row measures what
  that alone costs.

Then one federation per strategy (Flower simulation, the path of `fedmm run`):
FedAvg, FedProx, FedAdam and FedYogi at the run's rank, and, with client ranks
4/8/16 by partition, naive FedAvg of the zero-padded A and B factors vs the
three heterogeneous-rank aggregators (HetLoRA, FLoRA, SVD-LoRA). ``--rows``
also takes the variants in ``VARIANTS`` (server momentum, a strong proximal
term, fewer local steps), not run by default.

The references train on the clients' loss (``loss`` in the run config:
ClipLoss by default, ``--run-config "loss='unicl'"`` or
``"loss='public-negatives'"`` for the others). Every accuracy is the central zero-shot
accuracy on the server's held-out split.
The target is 95% of the centralized accuracy; rounds-to-target is the first
round whose accuracy reaches it ("—" if none within the rounds run).
Usage:

    .venv/bin/python benchmarks/strategies.py [--rounds 30] [--clients 10] \
        [--partitionings iid,0.1,classes1] [--local-rounds N] [--rows centralized,fedavg,...] [--run-config "k=v ..."]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from jobs import ROOT, prepare, run_job

sys.path.insert(0, str(ROOT))

HETERO_RANKS = "4,8,16"
FEDERATED = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox", "proximal-mu": 0.01},
    "fedadam": {"strategy": "fedadam", "strategy-args": "eta=0.01 tau=0.001"},
    "fedyogi": {"strategy": "fedyogi", "strategy-args": "eta=0.01 tau=0.001"},
    "naive-4/8/16": {"strategy": "fedavg", "lora-ranks": HETERO_RANKS},
    "hetlora-4/8/16": {"strategy": "hetlora", "lora-ranks": HETERO_RANKS},
    "flora-4/8/16": {"strategy": "flora", "lora-ranks": HETERO_RANKS},
    "svdlora-4/8/16": {"strategy": "svdlora", "lora-ranks": HETERO_RANKS},
}
# Selectable with --rows, not run by default: attempts to close the gap at α=0.1 (docs/benchmarks-log.md).
VARIANTS = {
    "fedavgm-0.9": {"strategy": "fedavgm", "strategy-args": "server_momentum=0.9"},
    "fedprox-1": {"strategy": "fedprox", "proximal-mu": 1.0},
    "fedavg-4steps": {"strategy": "fedavg", "local-steps": 4},
}
REFERENCES = ("centralized", "local-only", "client-batches")


def partitioning(name: str) -> tuple[dict, str]:
    """Run-config keys and table label of a ``--partitionings`` entry: 'iid', a Dirichlet alpha, or
    'classes<k>' (pathological: k classes per client)."""
    if name == "iid":
        return {"partitioner": "iid"}, "IID"
    if name.startswith("classes"):
        k = int(name.removeprefix("classes"))
        return {"partitioner": "pathological", "classes-per-client": k}, f"{k} class{'es' if k > 1 else ''} per client"
    return {"partitioner": "dirichlet", "dirichlet-alpha": float(name)}, f"Dirichlet α={name}"


def references(settings, clients: int, rounds: int, local_rounds: int,
               rows: list[str]) -> dict[str, tuple[dict[int, float], float]]:
    """Accuracy per round (its worth of steps) and wall seconds of the reference rows in ``rows``.

    Local-only's curve is the mean over clients, round by round.
    """
    from datasets import concatenate_datasets

    from fedmm import lora
    from fedmm import model as models
    from fedmm.data import class_names, load_splits, to_batch, zero_shot_prompts
    from fedmm.data.partition import client_split
    from fedmm.evaluate import class_embeddings, evaluate
    from fedmm.pretrain import load_base_model
    from fedmm.privacy import public_pool
    from fedmm.losses import client_objective
    from fedmm.train import forward, train_steps

    splits = load_splits(settings.dataset)
    base = load_base_model(settings, progress=False)
    tokenizer = models.create_tokenizer(settings.model)
    preprocess = models.image_mean_std(base)
    prompts = zero_shot_prompts(class_names(splits["server"]))
    held_out = to_batch(splits["server"], tokenizer, *preprocess)
    parts = [client_split(settings, splits["clients"], pid, clients)[0] for pid in range(clients)]
    public = None
    if settings.public_draw:  # the clients' loss uses public pairs; the references train on it too
        public = to_batch(public_pool(splits["public"], settings.public_draw, settings.seed), tokenizer, *preprocess)

    def objective(net, seed: int):
        """The clients' loss for ``net``."""
        return client_objective(settings, net, public, seed=seed)

    def new_adapter():
        torch.manual_seed(settings.seed)  # the federation's LoRA init
        return lora.attach_lora(copy.deepcopy(base), settings.lora_rank, settings.lora_alpha,
                                settings.lora_target_list)

    @torch.no_grad()
    def accuracy(net) -> float:
        return evaluate(net, held_out, class_embeddings(net, tokenizer, prompts))["zs-acc"]

    def fit(ds, seed: int, rounds: int) -> dict[int, float]:
        per_round = settings.local_steps
        net = new_adapter()
        curve: dict[int, float] = {}

        def every_round(step: int, _loss: float) -> None:
            if step % per_round == 0:
                curve[step // per_round] = accuracy(net)

        train_steps(net, to_batch(ds, tokenizer, *preprocess), steps=rounds * per_round,
                    batch_size=settings.batch_size, lr=settings.lr, weight_decay=settings.weight_decay, seed=seed,
                    loss_fn=objective(net, seed), progress=every_round)
        return curve

    def fit_client_batches(rounds: int) -> dict[int, float]:
        """One adapter and one AdamW on all the data, but each step's batch from one client (round-robin)."""
        net = new_adapter()
        data = [to_batch(ds, tokenizer, *preprocess) for ds in parts if len(ds) >= 2]
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        loss_fn, gen, curve = objective(net, settings.seed), torch.Generator().manual_seed(settings.seed), {}
        for step in range(1, rounds * settings.local_steps + 1):
            own = data[step % len(data)]
            batch = own.subset(torch.randperm(len(own), generator=gen)[: settings.batch_size])
            out = forward(net, batch)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(out, batch).backward()
            optimizer.step()
            if step % settings.local_steps == 0:
                curve[step // settings.local_steps] = accuracy(net)
        return curve

    out = {}
    start = time.perf_counter()
    if "centralized" in rows:
        curve = fit(concatenate_datasets(parts), settings.seed, rounds)
        out["centralized"] = (curve, time.perf_counter() - start)
    start = time.perf_counter()
    if "local-only" in rows:
        alone = [fit(ds, settings.seed + pid, local_rounds) for pid, ds in enumerate(parts) if len(ds) >= 2]
        curve = {r: statistics.mean(c[r] for c in alone) for r in alone[0]}
        out["local-only"] = (curve, time.perf_counter() - start)
    start = time.perf_counter()
    if "client-batches" in rows:
        out["client-batches"] = (fit_client_batches(rounds), time.perf_counter() - start)
    return out


def row(label: str, name: str, accuracy: dict[int, float], central: float, wall: float) -> str:
    """One table row: final and best accuracy, first round reaching 95% of ``central``, share of it, minutes."""
    rounds = {r: acc for r, acc in accuracy.items() if r > 0}
    final = rounds[max(rounds)]
    hit = [r for r, acc in sorted(rounds.items()) if acc >= 0.95 * central]
    return (f"| {label} | {name} | {final:.2%} | {max(rounds.values()):.2%} | {hit[0] if hit else '—'} "
            f"| {final / central:.0%} | {wall / 60:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--partitionings", default="iid,0.1",
                        help="comma-separated: 'iid', Dirichlet alphas, 'classes<k>' (k classes per client)")
    parser.add_argument("--local-rounds", type=int, default=0, help="rounds of local-only training (0 = --rounds)")
    parser.add_argument("--rows", default=",".join(["centralized", "local-only", *FEDERATED]))
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    federated = {**FEDERATED, **VARIANTS}
    unknown = sorted(set(rows) - set(REFERENCES) - set(federated))
    if unknown or "centralized" not in rows:
        known = ", ".join([*REFERENCES, *federated])
        parser.error(f"rows must include 'centralized' (the target) and be among {known}")
    common, _, work = prepare(args.run_config, args.rounds, "strategies")
    from fedmm.config import Settings

    print("| partitioning | run | final zs-acc | best zs-acc | rounds to 95% of centralized | final / centralized "
          "| wall (min) |")
    print("|---|---|---|---|---|---|---|")
    for part in args.partitionings.split(","):
        part_config, label = partitioning(part)
        config = {**common, **part_config}
        refs = references(Settings.from_run_config(config), args.clients, args.rounds,
                          args.local_rounds or args.rounds, rows)
        curve, _ = refs["centralized"]
        central = curve[max(curve)]
        for name, (accuracy, wall) in refs.items():
            print(row(label, name, accuracy, central, wall), flush=True)
        for name in (r for r in rows if r in federated):
            job = f"{part}-{name.replace('/', '-')}"
            report, wall = run_job(job, {**config, **federated[name]}, args.clients, work)
            accuracy = {r: v["central/zs-acc"] for r, v in report["rounds"].items()}
            print(row(label, name, accuracy, central, wall), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
