"""fedmm ServerApp: settings -> strategy -> rounds -> final adapter + report.

One round (see docs/architecture.md): the strategy samples nodes and sends
them the global adapter (an ``ArrayRecord`` of LoRA tensors only) with a
train ``ConfigRecord``; clients train and reply; the strategy aggregates;
clients evaluate on their held-out split; the server evaluates the new
global adapter on its own held-out split (``central/*`` metrics).
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.config import parse_config_args
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.logger import FLOWER_LOGGER

import strategies
from fedmm import lora
from fedmm.logs import quiet_root_logger
from fedmm import model as models
from fedmm import report
from fedmm.config import ConfigError, Settings
from fedmm.constraints import flag_toxic
from fedmm.data import class_names, group_names, load_splits, to_batch, zero_shot_prompts
from fedmm.evaluate import class_embeddings, evaluate
from fedmm.protocol import is_downlink_only
from fedmm.pretrain import load_base_model
from server.checkpoint import ResumedRounds, load_checkpoint, load_rng_state, load_strategy_state, save_checkpoint
from server.history import MetricsHistory, RecordsRound
from server.privacy import privacy_plan, privacy_summary
from strategies.builtin import RANGES, check_local_optimizer, check_population
from strategies.compression import CompressedUpdates
from strategies.constraints import Constraint, DualAscentConstraints
from strategies.privacy import check_uniform_mean, make_private_strategy, needs_uniform_mean
from fedmm.protocol import to_numpy
from strategies.replies import ReplyCheck
from strategies.timing import TimedStrategy
from strategies.validation import UpdateValidation

app = ServerApp()

# Every Flower record printed once: no root handler from a library's basicConfig (fedmm/logs.py).
quiet_root_logger()


class _ToFlowerLog(logging.Handler):
    """Send fedmm's library logs (e.g. base pretraining progress) to Flower's log stream."""

    def emit(self, record: logging.LogRecord) -> None:
        FLOWER_LOGGER.handle(record)


logging.getLogger("fedmm").addHandler(_ToFlowerLog())
logging.getLogger("fedmm").setLevel(logging.INFO)

# Printed each round, in this order, when present.
HEADLINE = ("central/zs-acc", "central/i2t-R@1", "central/t2i-R@1", "evaluate/zs-acc", "train/train-loss",
            "central/acc-gap", "central/toxic-top1", "constraints/multiplier-group-gap",
            "constraints/multiplier-toxicity", "privacy/epsilon", "train/dp-epsilon-max")


def output_dir(settings: Settings) -> Path:
    if settings.output_dir:
        return Path(settings.output_dir).expanduser().resolve()
    return Path.home() / "fedmm-runs" / datetime.now().strftime("%Y%m%d-%H%M%S")


def make_strategy(settings: Settings, history: MetricsHistory, num_nodes: int | None = None) -> RecordsRound:
    """The run's strategy, built from the settings and ``strategy-args``, wrapped for constraints, privacy and decoding.

    ``num_nodes`` (the federation's size) sizes client-level DP; None builds the
    strategy without its privacy wrapper (to validate the arguments early).
    """
    managed = {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": settings.min_nodes,
        "min_evaluate_nodes": settings.min_nodes,
        "min_available_nodes": settings.min_nodes,
        "proximal_mu": settings.proximal_mu,
        "client_learning_rate": settings.lr,  # QFedAvg's estimate of the Lipschitz constant
        # The record keys fedmm's ClientApp reads and writes: not the user's to change.
        # client-level DP calibrates noise to a uniform mean; otherwise FedAvg weights by examples
        "weighted_by_key": "unit-weight" if needs_uniform_mean(settings.dp) else "num-examples",
        "arrayrecord_key": "arrays",
        "configrecord_key": "config",
        "train_loss_key": "train_loss",
        "train_metrics_aggr_fn": history.train_aggr,
        "evaluate_metrics_aggr_fn": history.evaluate_aggr,
    }
    assert set(managed) == strategies.MANAGED, "keep strategies.MANAGED in step"
    args = parse_config_args([settings.strategy_args]) if settings.strategy_args.strip() else {}
    strategy = strategies.build_strategy(settings.strategy, args, managed, RANGES)
    check_uniform_mean(strategy, settings.dp)
    check_local_optimizer(strategy, settings.local_optimizer)
    if settings.dp != "none" and hasattr(strategy, "train_loss_key"):
        raise ConfigError(
            f"run-config 'strategy' = '{settings.strategy}' with 'dp' = '{settings.dp}': the strategy reads each "
            "client's training loss, which no DP mode covers (it is computed from the private examples with no "
            "noise), so clients do not send it under DP; use another strategy, or dp = 'none'"
        )
    # Timed alone, its seconds against the whole chain's price fedmm's wrappers (wrapper-seconds). Flower's
    # central DP wrappers need FedAvg itself beneath them: there the timer goes above them, DP counting as strategy.
    central_dp = needs_uniform_mean(settings.dp) and num_nodes is not None
    if not central_dp:
        strategy = TimedStrategy(strategy)
    if settings.constraint_list:
        limits = {"group-gap": (settings.max_group_gap, settings.dual_step_group_gap),
                  "toxicity": (settings.max_toxic_rate, settings.dual_step_toxicity)}
        strategy = DualAscentConstraints(
            strategy, {name: Constraint(*limits[name]) for name in settings.constraint_list})
    if num_nodes is not None:
        strategy = make_private_strategy(
            strategy, settings.dp,
            noise_multiplier=settings.dp_noise_multiplier, clipping_norm=settings.dp_clip_norm,
            delta=settings.dp_delta, max_epsilon=settings.max_epsilon,
            num_nodes=num_nodes, num_sampled=num_sampled(settings, num_nodes),
        )
    if central_dp:
        strategy = TimedStrategy(strategy)
    # Every decoded update is checked (finiteness, absurd norms) before any wrapper below aggregates it; names,
    # dtypes and sizes are the codec's check on the payload, in CompressedUpdates just above.
    strategy = UpdateValidation(strategy, settings.max_update_norm_ratio, settings.update_norm_bound)
    # Always wrapped: with fp32 both ways the codec is the identity, and every run
    # gets the same decoding checks (names, dtypes, sizes, finiteness), byte counts and a
    # partition-order aggregation (deterministic).
    strategy = CompressedUpdates(strategy, settings.codec, settings.codec_downlink, settings.error_feedback,
                                 settings.seed)
    # Outermost: no reply reaches anything above unless it is well formed (records, metric types and
    # ranges, one key set per round), so no client can crash or end the run.
    return RecordsRound(ReplyCheck(strategy, settings.global_rank), history)


def find_wrapper(strategy: Strategy, kind: type) -> Strategy | None:
    """The wrapper of type ``kind`` in the chain of ``.strategy`` wrappers, if any."""
    return next((s for s in strategies.wrapper_chain(strategy) if isinstance(s, kind)), None)


def num_sampled(settings: Settings, num_nodes: int) -> int:
    """Nodes per training round, as Flower's FedAvg samples them."""
    return max(int(num_nodes * settings.fraction_train), settings.min_nodes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    # Validation first: a bad run config fails here, before any client is contacted.
    settings = Settings.from_run_config(context.run_config)
    history = MetricsHistory()
    make_strategy(settings, history)  # the strategy's own arguments, checked before anything else
    out = output_dir(settings)
    checkpoint = load_checkpoint(out) if settings.resume else None
    if checkpoint is not None:
        checkpoint.check_config(settings)  # before any client is contacted
    elif settings.resume:
        log(WARNING, "fedmm: resume: no checkpoint in %s, starting at round 1", out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(settings.seed)  # Flower samples nodes with Python's RNG

    splits = load_splits(settings.dataset)
    if settings.public_draw and len(splits["public"]) == 0:
        key = "public-captions" if settings.objective == "unicl" else "dp-negatives"
        raise ConfigError(
            f"run-config 'loss' = '{settings.objective}' (dp = '{settings.dp}') draws public pairs at every step "
            f"('{key}' = {settings.public_draw}), and the dataset has no public split (manifest column "
            f"'split' = public)" + (f"; set '{key}' = 0 to train in-batch only" if key == "public-captions" else "")
        )
    log(INFO, "fedmm: building base model %s (%s)", settings.model, settings.pretrained)
    base = load_base_model(settings)
    base_id = models.fingerprint(base)  # clients refuse to train on a different base
    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    tokenizer = models.create_tokenizer(settings.model)
    mean, std, size = models.image_mean_std(base)
    num_classes = len(class_names(splits["server"]))
    prompts = zero_shot_prompts(class_names(splits["server"]))
    torch.manual_seed(settings.seed)  # LoRA init is part of the seeded run
    # the global adapter has the largest client rank; clients of lower rank fit it to theirs
    rank = settings.global_rank
    net = lora.attach_lora(base, rank, settings.lora_alpha_for(rank), settings.lora_target_list)
    # toxic captions of the held-out split are the distractors of the toxic-retrieval measurement
    held_out = to_batch(splits["server"], tokenizer, mean, std, size, toxic=flag_toxic(splits["server"]["caption"]))
    initial = ArrayRecord(torch_state_dict=lora.adapter_state(net))
    adapter_bytes = initial.count_bytes()
    log(
        INFO,
        "fedmm: base %s; adapter %d tensors, %.1f KiB (%.2f%% of the %.1f MiB base); %d classes, "
        "%d server held-out samples; report -> %s",
        base_id, len(initial), adapter_bytes / 1024, 100 * adapter_bytes / full_bytes, full_bytes / 2**20,
        num_classes, len(held_out), out,
    )
    num_nodes = len(list(grid.get_node_ids()))
    if num_nodes > len(splits["clients"]):
        raise ValueError(f"{num_nodes} nodes but only {len(splits['clients'])} client samples")
    strategy = make_strategy(settings, history, num_nodes)
    check_population(strategies.innermost(strategy), num_sampled(settings, num_nodes))
    num_rounds, privacy_notes = privacy_plan(settings, num_nodes, splits)
    # the privacy_spent() of Flower's accounted DP wrappers, wherever in the chain
    ledger = next((s.privacy_spent for s in strategies.wrapper_chain(strategy) if hasattr(s, "privacy_spent")), None)
    duals = find_wrapper(strategy, DualAscentConstraints)
    validation = find_wrapper(strategy, UpdateValidation)
    reply_check = find_wrapper(strategy, ReplyCheck)
    codec = find_wrapper(strategy, CompressedUpdates)

    inner = find_wrapper(strategy, TimedStrategy)  # the user's strategy alone
    chain = TimedStrategy(strategy)  # the user's strategy and every fedmm wrapper
    done = 0
    if checkpoint is not None:
        done = checkpoint.server_round
        initial = checkpoint.arrays
        load_strategy_state(strategy, checkpoint.strategy, checkpoint.state_arrays, f"checkpoint {checkpoint.state_file}")
        history.load_state_dict(checkpoint.history)
        load_rng_state(checkpoint.rng, checkpoint.state_arrays)
        log(INFO, "fedmm: resuming %s after round %d of %d", out, done, num_rounds)
    round_started = [time.perf_counter()]

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += done
        if server_round == done and done:  # evaluated and recorded before the interruption
            return None
        lora.load_global(net, dict(to_numpy(arrays)))  # adapter, and a strategy's frozen update if any
        # the adapter changes the text tower too: embed the prompts with it
        metrics = evaluate(net, held_out, class_embeddings(net, tokenizer, prompts))
        history.record_central(server_round, metrics)
        now = time.perf_counter()
        if server_round > 0:
            history.record(server_round, "round-seconds", now - round_started[0])
            history.record(server_round, "wrapper-seconds",
                           chain.seconds.get(server_round, 0.0) - inner.seconds.get(server_round, 0.0))
            history.record(server_round, "server-rss-mib", psutil.Process().memory_info().rss / 2**20)
            for key, value in codec.stats.get(server_round, {}).items():
                history.record(server_round, key.replace("bytes-", "bytes/", 1), value)
            for key, value in reply_check.stats.get(server_round, {}).items():
                history.record(server_round, key, value)
            for key, value in validation.stats.get(server_round, {}).items():
                history.record(server_round, f"validation/{key}", value)
            if duals is not None:
                for key, value in duals.history.get(server_round, {}).items():
                    history.record(server_round, key, value)
            spent = ledger() if ledger is not None else None
            if spent is not None:
                history.record(server_round, "privacy/epsilon", spent.epsilon)
        row = history.rounds[server_round]
        shown = " ".join(f"{k}={row[k]:.4f}" for k in HEADLINE if k in row)
        log(INFO, "fedmm round %d/%d: %s", server_round, num_rounds, shown)
        if server_round > 0:  # the round is complete: everything needed to continue after it
            save_checkpoint(out, server_round, arrays, strategy, history.state_dict(), settings)
            history.record(server_round, "checkpoint-seconds", time.perf_counter() - now)
        round_started[0] = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    train_config = ConfigRecord(
        {
            "lr": settings.lr,
            "local-optimizer": settings.local_optimizer,
            "local-steps": settings.local_steps,
            "batch-size": settings.batch_size,
            "proximal-mu": settings.proximal_mu,
            "base-fingerprint": base_id,
            # QFedAvg reads each client's loss of the global model; others do not pay for it.
            "report-train-loss": hasattr(strategies.innermost(strategy), "train_loss_key"),
        }
    )
    final_arrays = initial
    if done < num_rounds:
        result = (ResumedRounds(chain, done) if done else chain).start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=num_rounds - done,
            timeout=settings.round_timeout,
            train_config=train_config,
            evaluate_config=ConfigRecord({"base-fingerprint": base_id}),
            evaluate_fn=central_eval,
        )
        final_arrays = result.arrays if len(result.arrays) else initial
    final = dict(to_numpy(final_arrays))
    lora.load_global(net, final)
    adapter_dir = lora.export_peft(net, out / "adapter")
    frozen = {k: v for k, v in final.items() if is_downlink_only(k)}
    if frozen:  # e.g. FLoRA's merged update: part of the model, outside PEFT's format
        save_file({k: torch.as_tensor(v).contiguous() for k, v in frozen.items()},
                  str(adapter_dir / "fedmm_frozen_update.safetensors"))
        log(INFO, "fedmm: the strategy's frozen update (add scale * B @ A to each layer's base weight) -> %s",
            adapter_dir / "fedmm_frozen_update.safetensors")
    paths = report.write_report(
        out,
        settings=settings,
        rounds=dict(history.rounds),
        clients=history.clients,
        extra={
            "adapter-bytes": adapter_bytes,
            "base-model-bytes": full_bytes,
            "adapter-dir": str(adapter_dir),
            "privacy": privacy_summary(settings, num_nodes, privacy_notes),
            "group-names": group_names(splits["server"]),
            "failed-replies": codec.failures,
            "dropped-updates": reply_check.drops + codec.drops + validation.drops,
        },
    )
    log(INFO, "fedmm: final adapter (PEFT format) -> %s", adapter_dir)
    log(INFO, "fedmm: report -> %s", paths["summary"])
