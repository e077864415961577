"""QFedAvg's server step against FedAvg's, with AdamW or plain-SGD clients (in-process, tiny model).

Flower's QFedAvg takes L = 1/lr, reading a client update as lr x its summed gradients. This replays
its aggregation (``compute_delta_and_h``) on the same client updates FedAvg averages, so the two steps
compare directly; the global model follows QFedAvg's step.

    .venv/bin/python benchmarks/qfedavg_step.py --optimizer adamw --lr 0.003 [--q 0.2] [--rounds 3] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch
from flwr.serverapp.strategy.qfedavg import compute_delta_and_h, l2_norm

from jobs import ROOT

sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--q", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()

    from fedmm import lora
    from fedmm import model as models
    from fedmm.config import Settings
    from fedmm.data import class_names, load_splits, to_batch, zero_shot_prompts
    from fedmm.data.partition import client_split
    from fedmm.evaluate import class_embeddings, evaluate
    from fedmm.pretrain import load_base_model
    from fedmm.losses import client_objective
    from fedmm.train import mean_loss, train_steps

    torch.set_num_threads(1)
    s = Settings.from_run_config({"model": "fedmm-tiny-vit", "pretrain-steps": 400, "partitioner": "iid",
                                  "cache-dir": args.cache_dir})
    splits = load_splits(s.dataset)
    base = load_base_model(s, progress=False)
    tokenizer, preprocess = models.create_tokenizer(s.model), models.image_mean_std(base)
    prompts = zero_shot_prompts(class_names(splits["server"]))
    held_out = to_batch(splits["server"], tokenizer, *preprocess)
    parts = [to_batch(client_split(s, splits["clients"], p, args.clients)[0], tokenizer, *preprocess)
             for p in range(args.clients)]
    torch.manual_seed(0)
    net = lora.attach_lora(copy.deepcopy(base), s.lora_rank, s.lora_alpha, s.lora_target_list)
    names = list(lora.get_adapter_arrays(net))

    def get() -> list[np.ndarray]:
        return list(lora.get_adapter_arrays(net).values())

    def put(weights: list[np.ndarray]) -> None:
        lora.set_adapter_arrays(net, dict(zip(names, weights)))

    def step(new: list[np.ndarray], old: list[np.ndarray]) -> float:
        return float(np.sqrt(l2_norm([a - b for a, b in zip(new, old)])))  # Flower's l2_norm is the squared norm

    def accuracy() -> float:
        return evaluate(net, held_out, class_embeddings(net, tokenizer, prompts))["zs-acc"]

    print(f"round 0: zs-acc {accuracy():.4f}")
    for r in range(1, args.rounds + 1):
        glob, local, losses = get(), [], []
        for k, data in enumerate(parts):
            put(glob)
            objective = client_objective(s, net, None, seed=r)
            losses.append(mean_loss(net, data, s.batch_size, objective))  # F_k(w), QFedAvg's train_loss
            train_steps(net, data, steps=args.local_steps, batch_size=s.batch_size, lr=args.lr, seed=10 * r + k,
                        loss_fn=objective, optimizer=args.optimizer)
            local.append(get())
        fedavg = [np.mean([w[i] for w in local], axis=0) for i in range(len(glob))]
        sum_delta, sum_h = None, 0.0
        for weights, loss in zip(local, losses):
            delta, h = compute_delta_and_h(glob, [w.copy() for w in weights], args.q, 1.0 / args.lr, loss)
            sum_delta = delta if sum_delta is None else [a + b for a, b in zip(sum_delta, delta)]
            sum_h += h
        qfedavg = [g - d / sum_h for g, d in zip(glob, sum_delta)]
        step_f, step_q = step(fedavg, glob), step(qfedavg, glob)
        put(qfedavg)
        print(f"round {r}: |FedAvg step| {step_f:.4f}  |QFedAvg step| {step_q:.4f}  ratio {step_q / step_f:.4f}  "
              f"zs-acc after QFedAvg {accuracy():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
