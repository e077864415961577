"""fedmm ClientApp: local LoRA training and evaluation on one partition.

Base model, tokenizer, class prompts and the partition are built once per
process (clients/node.py) and reused across messages and rounds; only the adapter
arrays change hands. Obligations honoured for the built-in strategies: the
reply carries ``num-examples``; ``proximal-mu`` > 0 in the train config adds
FedProx's mu/2 * ||w - w_global||^2 over the adapter tensors. Clients of
different LoRA ranks (``lora-ranks``): each trains its own rank, fitted from
the global adapter (``lora.load_global``: truncation, plus any frozen update
a strategy sends), and replies zero-padded to the global rank with its
``lora-rank`` in the metrics (see strategies/lora_base.py). A method with a
client half (the run's ``strategy`` registered in ``fedmm.client_methods``,
fedmm/methods/) is called at the points of the round its interface names.
"""

from __future__ import annotations

import random
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.compression_mod import compression_mod
from clients.faults_mod import fault_injection_mod
from clients.instructions import instruction_check_mod
from clients.messages import decline
from clients.node import Node, load_global, node_of
from clients.privacy_mod import budget_refusal, load_ledger, privacy_mod, store_ledger
from clients.secagg_mod import answer_stage, secagg_mod
from fedmm import lora, pacing, protocol
from fedmm.constraints import ConstraintTerm
from fedmm.data import ManifestError
from fedmm.device import DeviceUnavailable
from fedmm.evaluate import class_embeddings
from fedmm.evaluate import evaluate as evaluate_metrics
from fedmm.logs import quiet_root_logger
from fedmm.methods import ClientMethod, method_class
from fedmm.losses import LossFn, PublicNegativesLoss, client_objective
from fedmm.privacy import sample_epsilon, sample_rate, train_dp_sgd
from fedmm.privacy.release import released_train_metrics
from fedmm.protocol import rank_of, to_record, trainable
from fedmm.train import LossTerm, TrainStats, mean_loss, proximal_term, train_steps

# Outermost first: the server's instruction is checked before anything reads it; secure aggregation keeps
# the encoded update and masks it in the stages that follow (clients/secagg_mod.py); compression encodes what
# the privacy mod released (clip -> noise -> quantize); injected faults (tests, benchmarks) act on the
# released update, as a client that skips clipping would.
app = ClientApp(mods=[instruction_check_mod, secagg_mod, compression_mod, fault_injection_mod, privacy_mod])

# Every Flower record printed once: no root handler from a library's basicConfig (fedmm/logs.py).
quiet_root_logger()


@dataclass(frozen=True)
class LocalRound:
    """The round's training parameters, read from the server's train config (instruction_check_mod checked
    them); a bare instruction (no such key) falls back to the run config, which is Flower's convention for
    what the ClientApp knows of its run. Steps and batch size are the server's, lowered to the client's
    tier's where that is less (a tier may only lower them: ``RankPlan.problem``)."""

    server_round: int
    lr: float
    optimizer: str
    proximal_mu: float
    report_train_loss: bool
    multipliers: dict[str, float]
    local_steps: int
    batch_size: int
    seed: int  # distinct, reproducible minibatch order and public draws per (run seed, round, client)

    @classmethod
    def of(cls, config: ConfigRecord, node: Node) -> LocalRound:
        s = node.settings
        server_round = protocol.integer(config, protocol.SERVER_ROUND, 0)
        return cls(
            server_round=server_round,
            lr=protocol.number(config, protocol.LR, s.lr),
            optimizer=str(config.get(protocol.LOCAL_OPTIMIZER, s.local_optimizer)),
            proximal_mu=protocol.number(config, protocol.PROXIMAL_MU, s.proximal_mu),
            report_train_loss=bool(config.get(protocol.REPORT_TRAIN_LOSS, False)),
            # constraint multipliers, sent by strategies/constraints.py when a constraint is on
            multipliers={c: protocol.number(config, protocol.multiplier_key(c)) for c in protocol.CONSTRAINTS
                         if protocol.multiplier_key(c) in config},
            local_steps=min(protocol.integer(config, protocol.LOCAL_STEPS, s.local_steps), node.profile.local_steps),
            batch_size=min(protocol.integer(config, protocol.BATCH_SIZE, s.batch_size), node.profile.batch_size),
            seed=zlib.crc32(f"{s.seed}:{server_round}:{node.partition_id}".encode()),
        )


def _site(context: Context) -> Node | str:
    """This node's model and data, or why they cannot be used here (a site's unknown labels, a missing file, a
    device this machine lacks)."""
    try:
        return node_of(context)
    except (ManifestError, DeviceUnavailable) as exc:
        return str(exc)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _site(context)
    if isinstance(node, str):
        return decline(msg, node)
    plan = LocalRound.of(protocol.config_in(msg.content), node)
    absent = _sits_out(node, plan)
    if absent:
        return decline(msg, absent)
    global_arrays, global_params = load_global(node, msg)
    s, profile = node.settings, node.profile
    try:
        method = _method(node, msg, context, plan)
    except MissingMethod as exc:
        return decline(msg, str(exc))
    method.begin(node.net, global_arrays)
    extra = {}
    if plan.report_train_loss:  # F_k(w_global) before local training: QFedAvg's obligation, when it asks
        extra[protocol.GLOBAL_TRAIN_LOSS] = mean_loss(node.net, node.train, plan.batch_size, _loss(node, plan))
    terms = [proximal_term(global_params, plan.proximal_mu)] if plan.proximal_mu > 0 else []
    constraint = None
    if plan.multipliers:
        run = node.run
        constraint = ConstraintTerm(plan.multipliers, lambda: class_embeddings(node.net, run.tokenizer, run.prompts),
                                    num_groups=run.num_groups)
        terms.append(constraint)
    terms += method.loss_terms(node.net)
    loss_fn = _loss(node, plan)
    if s.dp == "dp-sgd":
        if constraint is not None:  # Settings refuses this pairing; a foreign server's config might not
            raise ValueError("constraint terms couple the examples of a batch: DP-SGD's guarantee would not hold")
        outcome = _train_dp_sgd(node, context, plan, loss_fn, terms)
        if isinstance(outcome, str):
            return decline(msg, f"partition {node.partition_id}: {outcome}")
        stats, ledger_metrics = outcome
        extra.update(ledger_metrics)
    else:
        stats = _local_steps(node, plan, terms, loss_fn)
    if constraint is not None:
        extra.update(constraint.statistics())
    reply = _train_reply(msg, node, plan, global_arrays, stats, extra,
                         method.reply_arrays(node.net, global_arrays, stats.steps))
    # what never leaves the client (a personal model) trains after the reply is fixed, without DP: nothing of
    # it is sent but its evaluate metrics, which the report lists outside the guarantee
    def personal_steps(more: list[LossTerm]) -> None:
        _local_steps(node, plan, more, _loss(node, plan))

    method.after_reply(node.net, global_arrays, personal_steps)
    if profile.delay > 0:  # a slower device's tier: the reply comes this much later, without taking CPU
        pacing.wait(profile.delay)
    return reply


def _local_steps(node: Node, plan: LocalRound, terms: list[LossTerm], loss_fn: LossFn) -> TrainStats:
    s, profile = node.settings, node.profile
    return train_steps(
        node.net, node.train, steps=plan.local_steps, batch_size=plan.batch_size, lr=plan.lr,
        weight_decay=s.weight_decay, seed=plan.seed, extra_terms=terms, loss_fn=loss_fn,
        time_budget=profile.time_budget, precision=profile.precision, optimizer=plan.optimizer,
    )


def _method(node: Node, msg: Message, context: Context, plan: LocalRound | None) -> ClientMethod:
    """The client half of the run's method for this message (FedAvg's, which does nothing, when it has none)."""
    config = protocol.config_in(msg.content) if protocol.CONFIG in msg.content else ConfigRecord({})
    s = node.settings
    name = protocol.text(config, protocol.METHOD, s.strategy)
    method = method_class(name)
    if protocol.METHOD in config and method is ClientMethod:
        raise MissingMethod(f"partition {node.partition_id}: the server runs method '{name}', whose client half "
                            f"(entry point '{name}' in fedmm.client_methods) is not installed on this site")
    return method(config, context.state, plan.lr if plan else s.lr, plan.local_steps if plan else s.local_steps)


class MissingMethod(RuntimeError):
    """The run's method has a client half this site does not have installed."""


def _sits_out(node: Node, plan: LocalRound) -> str | None:
    """Why this client does not train this round (its tier's dropout, too little data), or None."""
    profile = node.profile
    if profile.dropout > 0 and random.Random(plan.seed).random() < profile.dropout:
        return (f"partition {node.partition_id}: profile '{profile.name}' dropped out of round "
                f"{plan.server_round} (dropout {profile.dropout})")
    if len(node.train) < 2:  # e.g. every image missing or corrupt: decline, do not fail the round
        return (f"partition {node.partition_id}: {len(node.train)} usable training pair(s) (image with "
                "caption or class prompt); contrastive training needs at least 2")
    return None


def _loss(node: Node, plan: LocalRound) -> LossFn:
    """The run's client loss, with this round's draw of public pairs if it uses them."""
    return client_objective(node.settings, node.net, node.run.public, seed=plan.seed)


def _train_dp_sgd(node: Node, context: Context, plan: LocalRound, loss_fn: LossFn,
                  terms: list[LossTerm]) -> tuple[TrainStats, dict[str, float]] | str:
    """DP-SGD within this client's budget: (stats, ledger metrics), or why it declines."""
    s = node.settings
    ledger = load_ledger(context)
    q = sample_rate(len(node.train), plan.batch_size)
    refusal = budget_refusal(ledger, (s.dp_noise_multiplier, q, plan.local_steps), s.dp_delta, s.max_epsilon)
    if refusal:
        return refusal
    if not isinstance(loss_fn, PublicNegativesLoss):  # Settings refuses any other loss under dp-sgd
        raise ValueError(f"DP-SGD needs the per-sample public-negatives loss, not {type(loss_fn).__name__}")
    stats, ledger = train_dp_sgd(
        node.net, node.train, loss_fn, steps=plan.local_steps, batch_size=plan.batch_size, lr=plan.lr,
        noise_multiplier=s.dp_noise_multiplier, max_grad_norm=s.dp_clip_norm, history=ledger,
        weight_decay=s.weight_decay, grad_sample_mode=s.dp_grad_sample_mode, extra_terms=terms,
        optimizer=plan.optimizer,
    )
    store_ledger(context, ledger)
    return stats, {protocol.DP_EPSILON: sample_epsilon(ledger, s.dp_delta), protocol.DP_SAMPLE_RATE: q}


def _train_reply(msg: Message, node: Node, plan: LocalRound, global_arrays: dict[str, np.ndarray],
                 stats: TrainStats, extra: dict[str, float], method_arrays: dict[str, np.ndarray]) -> Message:
    """The adapter with the global names and shapes (a lower rank zero-padded, layers this tier does not adapt
    as received) and the metrics, less what DP withholds (the raw losses: the private examples' function
    with no noise at all)."""
    reply = OrderedDict(trainable(global_arrays))
    reply.update(lora.pad_rank(lora.get_adapter_arrays(node.net), rank_of(global_arrays)))
    reply.update({k: v for k, v in method_arrays.items() if k in reply})  # a method's arrays: the global's names
    arrays = to_record(reply)
    metrics = MetricRecord(released_train_metrics(
        {
            protocol.NUM_EXAMPLES: len(node.train),
            protocol.UNIT_WEIGHT: 1,  # the weight of uniform-mean aggregation (client-level DP)
            protocol.PARTITION_ID: node.partition_id,
            protocol.LORA_RANK: node.rank,
            protocol.TRAIN_LOSS: stats.loss,
            protocol.CONTRASTIVE_LOSS: stats.clip_loss,
            protocol.TRAIN_SECONDS: stats.seconds,
            protocol.STEP_SECONDS: stats.seconds / max(1, stats.steps),
            protocol.STEPS_DONE: stats.steps,
            protocol.WORK_FRACTION: stats.steps / plan.local_steps,  # < 1: the time budget cut training short
            protocol.BYTES_UPLINK: arrays.count_bytes(),
            **extra,
        }, node.settings.dp))
    return Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=msg)


@app.query(protocol.SECAGG_ACTION)
def secure_aggregation_stage(msg: Message, context: Context) -> Message:
    """One stage of the round's secure aggregation (share, mask, unmask): clients/secagg_mod.py."""
    return answer_stage(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _site(context)
    if isinstance(node, str):
        return decline(msg, node)
    global_arrays, _ = load_global(node, msg)
    try:
        method = _method(node, msg, context, None)
    except MissingMethod as exc:
        return decline(msg, str(exc))
    method.begin(node.net, global_arrays)
    metrics: dict[str, protocol.MetricValue] = {protocol.NUM_EXAMPLES: len(node.test), protocol.UNIT_WEIGHT: 1,
                                 protocol.PARTITION_ID: node.partition_id}
    full = _evaluate(node, with_counts=True)
    for key in protocol.EVALUATE_SCALARS:
        metrics[key] = float(full.get(key, 0.0))
    # Counts, never predictions: the server sums them into exact federated
    # per-group accuracy, fairness gaps and toxic-retrieval rates.
    metrics.update({k: v for k, v in full.items() if k.startswith(protocol.EVALUATE_COUNTS)})
    # a personal model's scalars (protocol.PERSONAL), evaluated the same way
    metrics.update(method.evaluate(node.net, lambda: {k: float(_evaluate(node).get(k, 0.0))
                                                      for k in protocol.EVALUATE_SCALARS}))
    return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=msg)


def _evaluate(node: Node, with_counts: bool = False) -> dict[str, float]:
    """The node's model on its held-out split (nothing when it holds none)."""
    if not len(node.test):
        return {}
    # the adapter changes the text tower too: embed the prompts with it
    class_emb = class_embeddings(node.net, node.run.tokenizer, node.run.prompts)
    mean, std, _ = node.run.preprocess  # the audit perturbs pixels (fedmm/audit.py): on a client's split too
    return evaluate_metrics(node.net, node.test, class_emb, with_counts=with_counts, num_groups=node.run.num_groups,
                            audit=(mean, std))
