"""fedmm ClientApp: local LoRA training and evaluation on one partition.

Base model, tokenizer, class prompts and the partition are built once per
process (``_node``) and reused across messages and rounds; only the adapter
arrays change hands. Obligations honoured for the built-in strategies: the
reply carries ``num-examples``; ``proximal-mu`` > 0 in the train config adds
FedProx's mu/2 * ||w - w_global||^2 over the adapter tensors. Clients of
different LoRA ranks (``lora-ranks``): each trains its own rank, fitted from
the global adapter (``lora.load_global``: truncation, plus any frozen update
a strategy sends), and replies zero-padded to the global rank with its
``lora-rank`` in the metrics (see strategies/lora_base.py).
"""

from __future__ import annotations

import copy
import random
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.instructions import instruction_check_mod
from clients.mods import (
    budget_refusal,
    compression_mod,
    decline,
    fault_injection_mod,
    load_ledger,
    privacy_mod,
    store_ledger,
)
from fedmm.protocol import to_numpy, to_record
from fedmm import lora
from fedmm.logs import quiet_root_logger
from fedmm import model as models
from fedmm.protocol import LORA_RANK as RANK_METRIC, is_downlink_only, rank_of
from fedmm.config import Profile, Settings
from fedmm.constraints import CONSTRAINTS, MULTIPLIER_KEY, ConstraintTerm, flag_toxic
from fedmm.data import Batch, class_names, client_split, load_splits, to_batch, zero_shot_prompts
from fedmm.evaluate import class_embeddings
from fedmm.evaluate import evaluate as evaluate_metrics
from fedmm.pretrain import load_base_model
from fedmm.privacy import public_pool, sample_epsilon, sample_rate, train_dp_sgd
from fedmm.privacy.release import released_train_metrics
from fedmm.losses import client_objective
from fedmm.train import mean_loss, proximal_term, train_steps

# Outermost first: the server's instruction is checked before anything reads it; compression encodes what
# the privacy mod released (clip -> noise -> quantize); injected faults (tests, benchmarks) act on the
# released update, as a client that skips clipping would.
app = ClientApp(mods=[instruction_check_mod, compression_mod, fault_injection_mod, privacy_mod])

# Every Flower record printed once: no root handler from a library's basicConfig (fedmm/logs.py).
quiet_root_logger()


@dataclass
class RunState:
    """What every node of one run shares in this process: settings, model, prompts."""

    settings: Settings
    base: Any  # the frozen base, never modified: each rank's model is a copy with LoRA
    prompts: list[list[str]]  # zero-shot class prompts, embedded by the current adapter
    tokenizer: Any
    preprocess: tuple  # (mean, std, size)
    num_groups: int
    base_fingerprint: str
    public: Batch | None = None  # public pairs the objective draws from ('unicl', 'public-negatives')
    # (rank, targets) -> peft model, overwritten by every message
    nets: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict)

    def net(self, profile: Profile) -> Any:
        key = (profile.lora_rank, profile.lora_targets)
        if key not in self.nets:
            s = self.settings
            torch.manual_seed(s.seed)  # LoRA init as on the server (it is overwritten by the global anyway)
            # attach_lora modifies its model in place: copy the base unless every client has one adapter shape
            shared = len(set(s.client_ranks)) == 1 and not s.client_profiles.strip()
            base = self.base if shared else copy.deepcopy(self.base)
            self.nets[key] = lora.attach_lora(base, profile.lora_rank, s.lora_alpha_for(profile.lora_rank),
                                              list(profile.lora_targets))
        return self.nets[key]


@dataclass
class Node:
    run: RunState
    partition_id: int
    profile: Profile  # this client's tier: rank, layers, batch, steps, time budget, precision, dropout
    train: Batch
    test: Batch

    @property
    def settings(self) -> Settings:
        return self.run.settings

    @property
    def rank(self) -> int:
        return self.profile.lora_rank

    @property
    def net(self) -> Any:
        return self.run.net(self.profile)


# One simulation actor serves many nodes in turn: the model is built once per
# run and process, each partition's tensors once per node.
_RUNS: dict[tuple, RunState] = {}
_NODES: dict[tuple, Node] = {}


def _run_state(context: Context) -> RunState:
    key = tuple(sorted(context.run_config.items()))
    if key not in _RUNS:
        _RUNS.clear()  # a new run: drop the previous run's model and data
        _NODES.clear()
        settings = Settings.from_run_config(context.run_config)
        splits = load_splits(settings.dataset)
        base = load_base_model(settings, progress=False)
        base_id = models.fingerprint(base)
        tokenizer = models.create_tokenizer(settings.model)
        prompts = zero_shot_prompts(class_names(splits["clients"]))
        groups = splits["clients"]["group"]
        public = None
        if settings.public_draw and len(splits["public"]):
            pool = public_pool(splits["public"], settings.public_draw, settings.seed)
            public = to_batch(pool, tokenizer, *models.image_mean_std(base))
        _RUNS[key] = RunState(
            settings, base, prompts, tokenizer, models.image_mean_std(base),
            num_groups=max(groups) + 1 if len(groups) else 1,
            base_fingerprint=base_id,
            public=public,
        )
    return _RUNS[key]


def _node(context: Context) -> Node:
    """This node's model and data, built on first use in this process."""
    run = _run_state(context)
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    node_profile = context.node_config.get("profile")
    key = (id(run), pid, num, node_profile)
    if key not in _NODES:
        train_ds, test_ds = client_split(run.settings, load_splits(run.settings.dataset)["clients"], pid, num)
        # captions are flagged on-device by the classifier, not taken from the data's own labels
        _NODES[key] = Node(
            run, pid, run.settings.profile_for(pid, str(node_profile) if node_profile else None),
            to_batch(train_ds, run.tokenizer, *run.preprocess, toxic=flag_toxic(train_ds["caption"])),
            to_batch(test_ds, run.tokenizer, *run.preprocess, toxic=flag_toxic(test_ds["caption"])),
        )
    return _NODES[key]


def _load_global(node: Node, msg: Message) -> tuple[OrderedDict[str, np.ndarray], list[torch.Tensor]]:
    """Load the message's global adapter into the node's model: the global arrays, and the model's trainable copies."""
    expected = msg.content["config"].get("base-fingerprint") if "config" in msg.content else None
    if expected is not None and expected != node.run.base_fingerprint:
        raise ValueError(
            f"partition {node.partition_id}: this node's frozen base ({node.run.base_fingerprint}) "
            f"differs from the server's ({expected}); adapters trained on different bases "
            "cannot be averaged — check 'model', 'pretrained' and the base cache"
        )
    global_arrays = to_numpy(msg.content["arrays"])
    lora.load_global(node.net, dict(global_arrays))
    return global_arrays, [p.detach().clone() for p in lora.trainable_parameters(node.net)]


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content["config"]
    profile = node.profile
    server_round = int(config.get("server-round", 0))
    # Distinct, reproducible minibatch order per (run seed, round, client).
    seed = zlib.crc32(f"{node.settings.seed}:{server_round}:{node.partition_id}".encode())
    if profile.dropout > 0 and random.Random(seed).random() < profile.dropout:
        return decline(msg, f"partition {node.partition_id}: profile '{profile.name}' dropped out of round "
                            f"{server_round} (dropout {profile.dropout})")
    if len(node.train) < 2:  # e.g. every image missing or corrupt: decline, do not fail the round
        return decline(msg, f"partition {node.partition_id}: {len(node.train)} usable training pair(s) (image with "
                            "caption or class prompt); contrastive training needs at least 2")
    global_arrays, global_params = _load_global(node, msg)
    global_rank = rank_of(global_arrays)
    mu = float(config.get("proximal-mu", node.settings.proximal_mu))
    batch_size = profile.batch_size
    s = node.settings

    def objective():  # the run's client loss, with this round's draw of public negatives if it uses them
        return client_objective(s, node.net, node.run.public, seed=seed)

    # F_k(w_global) on the training objective before local training: QFedAvg's
    # obligation, only when the server's strategy asks (~15% of the local training time).
    extra = {}
    if bool(config.get("report-train-loss", False)):
        extra["train_loss"] = mean_loss(node.net, node.train, batch_size, objective())
    steps = profile.local_steps
    lr = float(config.get("lr", s.lr))
    optimizer = str(config.get("local-optimizer", s.local_optimizer))
    terms = [proximal_term(global_params, mu)] if mu > 0 else []
    # constraint multipliers, sent by strategies/constraints.py when a constraint is on
    multipliers = {c: float(config[MULTIPLIER_KEY.format(c)]) for c in CONSTRAINTS if MULTIPLIER_KEY.format(c) in config}
    constraint = None
    if multipliers:
        run = node.run
        constraint = ConstraintTerm(multipliers, lambda: class_embeddings(node.net, run.tokenizer, run.prompts),
                                    num_groups=run.num_groups)
        terms.append(constraint)
    loss_fn = objective()
    if s.dp == "dp-sgd":
        if constraint is not None:  # Settings refuses this pairing; a foreign server's config might not
            raise ValueError("constraint terms couple the examples of a batch: DP-SGD's guarantee would not hold")
        ledger = load_ledger(context)
        q = sample_rate(len(node.train), batch_size)
        refusal = budget_refusal(ledger, (s.dp_noise_multiplier, q, steps), s.dp_delta, s.max_epsilon)
        if refusal:
            return decline(msg, f"partition {node.partition_id}: {refusal}")
        stats, ledger = train_dp_sgd(
            node.net, node.train, loss_fn, steps=steps, batch_size=batch_size, lr=lr,
            noise_multiplier=s.dp_noise_multiplier, max_grad_norm=s.dp_clip_norm, history=ledger,
            weight_decay=s.weight_decay, grad_sample_mode=s.dp_grad_sample_mode, extra_terms=terms,
            optimizer=optimizer,
        )
        store_ledger(context, ledger)
        extra.update({"dp-epsilon": sample_epsilon(ledger, s.dp_delta), "dp-sample-rate": q})
    else:
        stats = train_steps(
            node.net, node.train, steps=steps, batch_size=batch_size, lr=lr,
            weight_decay=s.weight_decay, seed=seed, extra_terms=terms,
            loss_fn=loss_fn, time_budget=profile.time_budget, precision=profile.precision, optimizer=optimizer,
        )
    # replies have the global names and shapes: a lower-rank adapter is zero-padded, and
    # layers this profile does not adapt are returned as received (no update)
    reply = OrderedDict((k, v) for k, v in global_arrays.items() if not is_downlink_only(k))
    reply.update(lora.pad_rank(lora.get_adapter_arrays(node.net), global_rank))
    arrays = to_record(reply)
    # under DP the raw losses stay here: they are the private examples' function with no noise at all
    metrics = MetricRecord(released_train_metrics(
        {
            "num-examples": len(node.train),
            "unit-weight": 1,  # the weight of uniform-mean aggregation (client-level DP)
            "partition-id": node.partition_id,
            RANK_METRIC: node.rank,
            "train-loss": stats.loss,
            "contrastive-loss": stats.clip_loss,
            "train-seconds": stats.seconds,
            "step-seconds": stats.seconds / max(1, stats.steps),
            "steps-done": stats.steps,
            "work-fraction": stats.steps / steps,  # < 1: the profile's time budget cut local training short
            "bytes-uplink": arrays.count_bytes(),
            **extra,
            **(constraint.statistics() if constraint is not None else {}),
        }, s.dp))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    _load_global(node, msg)
    metrics: dict[str, float] = {"num-examples": len(node.test), "unit-weight": 1, "partition-id": node.partition_id}
    full = {}
    if len(node.test):  # the adapter changes the text tower too: embed the prompts with it
        class_emb = class_embeddings(node.net, node.run.tokenizer, node.run.prompts)
        full = evaluate_metrics(node.net, node.test, class_emb, with_counts=True, num_groups=node.run.num_groups)
    for key in ("zs-acc", "loss", "i2t-R@1", "t2i-R@1", "i2t-mrr", "t2i-mrr", "grounding"):
        metrics[key] = float(full.get(key, 0.0))
    # Counts, never predictions: the server sums them into exact federated
    # per-group accuracy, fairness gaps and toxic-retrieval rates.
    metrics.update({k: v for k, v in full.items() if k.startswith(("fair-", "tox-"))})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
