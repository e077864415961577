"""The run's strategy chain, built once: the user's strategy inside fedmm's wrappers, each with one job.

Outermost first (what a reply meets on its way in):

``RecordsRound``      files every record under its round (server/history.py)
``ReplyCheck``        drops every malformed reply (strategies/replies.py)
``ReplyBook``         counts failed and missing replies, orders replies by partition (strategies/reply_book.py)
[``SecureAggregation``] runs SecAgg+'s stages and hands on the contributors' mean (strategies/secure_aggregation.py)
``CompressedUpdates`` downlink encoding, uplink decoding (strategies/compression.py)
``UpdateValidation``  finiteness, absurd norms, norm bound (strategies/validation.py)
[``StalenessWeighting``] asynchronous runs: staleness weights, delay compensation (strategies/staleness.py)
[DP wrapper]          the dp mode's (strategies/privacy.py: ``make_private``)
``DualAscentConstraints`` multipliers (strategies/constraints.py), when constraints are on
the user's strategy   (strategies/: registry and built-ins)

Flower's central DP wrappers need FedAvg itself beneath them, so under central
and distributed DP the constraints wrapper sits above the DP wrapper (it only
adds multipliers to the config and reads the replies' statistics; the arrays
pass through to the DP wrapper untouched).

``TimedStrategy`` timers around the user's strategy and around the whole
chain price fedmm's wrappers (``wrapper-seconds``); under central DP the inner
timer sits above the DP wrapper (DP counted as strategy). ``build_chain`` returns a ``Chain`` that names
every part, so nothing has to look for a wrapper again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.common.config import parse_config_args
from flwr.serverapp.strategy import Strategy

import strategies
from fedmm import protocol
from fedmm.config import ConfigError, Settings
from fedmm.methods import composition_problem
from fedmm.privacy.plan import release_independent_of_one_client
from fedmm.privacy.release import EVALUATE_ALWAYS, EVALUATE_FAMILIES, TRAIN_FAMILIES, train_metric_keys
from fedmm.secagg.plan import SecAggPlan
from server.history import MetricsHistory, RecordsRound
from strategies.builtin import RANGES, check_local_optimizer, check_population
from strategies.compression import CompressedUpdates
from strategies.constraints import Constraint, DualAscentConstraints
from strategies.privacy import make_private, needs_uniform_mean
from strategies.replies import EVALUATE, TRAIN, ReplyCheck
from strategies.reply_book import ReplyBook
from fedmm.asynchrony import parse_staleness
from strategies.secure_aggregation import SecureAggregation, check_secure_aggregation, check_weighted_mean
from strategies.staleness import StalenessWeighting
from strategies.timing import TimedStrategy
from strategies.validation import UpdateValidation
from strategies.wrapper import ReportsRoundStats


def build_strategy(settings: Settings, history: MetricsHistory) -> Strategy:
    """The user's strategy from ``strategy`` and ``strategy-args``, checked against the run (before any client)."""
    managed = {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        # asynchronous: every version's content is configured for a cohort of the buffer's size (the release's)
        "min_train_nodes": settings.buffer_size if settings.asynchronous else settings.min_nodes,
        "min_evaluate_nodes": settings.min_nodes,
        "min_available_nodes": settings.buffer_size if settings.asynchronous else settings.min_nodes,
        "proximal_mu": settings.proximal_mu,
        "client_learning_rate": settings.lr,  # QFedAvg's estimate of the Lipschitz constant
        # The record keys fedmm's ClientApp reads and writes: not the user's to change.
        # client-level DP calibrates noise to a uniform mean; otherwise FedAvg weights by examples (asynchronous:
        # times the staleness weight, strategies/staleness.py)
        "weighted_by_key": protocol.UNIT_WEIGHT if needs_uniform_mean(settings.dp) else
        protocol.AGGREGATION_WEIGHT if settings.asynchronous else protocol.NUM_EXAMPLES,
        "arrayrecord_key": protocol.ARRAYS,
        "configrecord_key": protocol.CONFIG,
        "train_loss_key": protocol.GLOBAL_TRAIN_LOSS,
        "train_metrics_aggr_fn": history.train_aggr,
        "evaluate_metrics_aggr_fn": history.evaluate_aggr,
    }
    assert set(managed) == strategies.MANAGED, "keep strategies.MANAGED in step"
    args = parse_config_args([settings.strategy_args]) if settings.strategy_args.strip() else {}
    strategy = strategies.build_strategy(settings.strategy, args, managed, RANGES)
    check_local_optimizer(strategy, settings.local_optimizer)
    if settings.dp != "none" and hasattr(strategy, "train_loss_key"):
        raise ConfigError(
            f"run-config 'strategy' = '{settings.strategy}' with 'dp' = '{settings.dp}': the strategy reads each "
            "client's training loss, which no DP mode covers (it is computed from the private examples with no "
            "noise), so clients do not send it under DP; use another strategy, or dp = 'none'"
        )
    problem = composition_problem(settings.strategy, type(strategy), settings)  # a method's client half
    if problem:
        raise ConfigError(problem)
    make_private(strategy, settings, num_nodes=None)  # refuses a strategy the dp mode cannot wrap
    try:
        if settings.secure_aggregation:
            check_secure_aggregation(strategy)
        if settings.asynchronous:
            check_weighted_mean(strategy, "asynchronous", "each aggregation is a weighted mean of whichever "
                                "buffer-size updates arrived first, with no synchronous cohort behind it")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return strategy


@dataclass
class Chain:
    """The built chain and its parts, by name."""

    outer: TimedStrategy  # what Strategy.start runs: the whole chain, timed
    user: Strategy  # the strategy the run config selected
    reply_check: ReplyCheck
    book: ReplyBook
    codec: CompressedUpdates
    validation: UpdateValidation
    constraints: DualAscentConstraints | None
    ledger: Callable[[], Any] | None  # privacy_spent() of the DP wrapper that accounts the run, if any
    user_timer: TimedStrategy  # the user's strategy alone (with central DP: and its wrapper)
    secagg: SecureAggregation | None = None
    staleness: StalenessWeighting | None = None  # asynchronous runs

    @property
    def measured(self) -> list[ReportsRoundStats]:
        """The parts that measure something per round, in the order the report lists them."""
        parts: list[ReportsRoundStats] = [self.codec, self.book, self.reply_check, self.validation]
        return parts + [p for p in (self.secagg, self.constraints) if p is not None]

    @property
    def stateful(self) -> Strategy:
        """The chain beneath the outer timer: what a checkpoint saves and restores."""
        return self.outer.strategy


def build_chain(settings: Settings, strategy: Strategy, history: MetricsHistory, num_nodes: int) -> Chain:
    """Wrap the user's ``strategy`` for this run (``num_nodes`` sizes client-level DP)."""
    check_population(strategy, settings.sampled_per_round(num_nodes))
    plan = secagg_plan(settings, num_nodes)
    central_dp = needs_uniform_mean(settings.dp)
    ledger = None
    if central_dp:  # Flower's accounted DP wrappers need FedAvg itself beneath them: constraints go above
        strategy, ledger = make_private(strategy, settings, num_nodes=num_nodes, secagg=plan)
    user_timer = TimedStrategy(strategy)  # with central DP: the strategy and its DP wrapper, priced as strategy
    inner: Strategy = user_timer
    constraints = None
    if settings.constraint_list:
        inner = constraints = DualAscentConstraints(inner, _constraints(settings))
    if not central_dp:  # local DP asks the clients for noise; dp-sgd and none leave the chain as it is
        inner, ledger = make_private(inner, settings, num_nodes=num_nodes)
    staleness = None
    if settings.asynchronous:  # each buffered update weighted (and corrected) for the versions it missed
        inner = staleness = StalenessWeighting(inner, parse_staleness(settings.staleness),
                                               settings.delay_compensation, central_dp)
    # every decoded update is checked (finiteness, absurd norms) before anything below aggregates it; names,
    # dtypes and sizes are the codec's check on the payload, just above
    keep_every_reply = release_independent_of_one_client(settings.dp)  # a drop would void the release
    validation = UpdateValidation(inner, settings.max_update_norm_ratio, settings.update_norm_bound,
                                  keep_every_reply=keep_every_reply)
    # always wrapped: with fp32 both ways the codec is the identity, and every run gets the same decoding checks
    codec = CompressedUpdates(validation, settings.uplink_codec, settings.downlink_codec, settings.error_feedback,
                              settings.seed, keep_every_reply)
    secagg = None
    if plan is not None:  # the replies hold keys, then the stages' sum: every contributor's reply carries the mean
        secagg = SecureAggregation(codec, plan, settings.round_timeout, settings.seed)
    book = ReplyBook(secagg or codec)
    # outermost: no reply reaches anything above unless it is well formed, so no client can crash or end the run
    expected = {TRAIN: (train_metric_keys(settings.dp, settings.secure_aggregation,
                                            hasattr(strategies.innermost(strategy), "train_loss_key")),
                          TRAIN_FAMILIES),
                EVALUATE: (frozenset(EVALUATE_ALWAYS), EVALUATE_FAMILIES)}
    reply_check = ReplyCheck(book, settings.global_rank, settings.secure_aggregation, expected)
    outer = TimedStrategy(RecordsRound(reply_check, history))
    return Chain(outer, strategies.innermost(user_timer), reply_check, book, codec, validation, constraints, ledger,
                 user_timer, secagg, staleness)


def secagg_plan(settings: Settings, num_nodes: int) -> SecAggPlan | None:
    """The run's secure-aggregation plan (None without it); ConfigError names the key that does not fit."""
    if not settings.secure_aggregation:
        return None
    distributed = settings.dp == "distributed"  # then the ring's bound is the one the noise is calibrated to
    sigma, clip = (settings.dp_noise_multiplier, settings.dp_clip_norm) if distributed else \
        (0.0, settings.secagg_clip_norm)
    try:
        return SecAggPlan.of(settings.sampled_per_round(num_nodes), settings.secagg_bits, settings.secagg_threshold,
                             clip, sigma, settings.secagg_dropout)
    except ValueError as exc:
        raise ConfigError(f"run-config 'secure-aggregation': {exc}") from None


def check_ring(chain: Chain, dim: int) -> None:
    """Before round 1: refuse a ring that the sum of a round's clients could wrap (with the numbers)."""
    if chain.secagg is not None:
        try:
            chain.secagg.plan.code(dim)
        except ValueError as exc:
            raise ConfigError(f"run-config 'secagg-bits' = {chain.secagg.plan.bits}: {exc}") from None


def _constraints(settings: Settings) -> dict[str, Constraint]:
    return {name: Constraint(*limit) for name, limit in settings.constraint_limits.items()}


def make_strategy(settings: Settings, history: MetricsHistory, num_nodes: int | None = None) -> Strategy:
    """The chain beneath the outer timer (tests and benchmarks drive it directly); without ``num_nodes`` the
    user's strategy alone, checked."""
    strategy = build_strategy(settings, history)
    if num_nodes is None:
        return strategy
    return build_chain(settings, strategy, history, num_nodes).stateful


def find_wrapper(strategy: Strategy, kind: type) -> Strategy | None:
    """Tests: the wrapper of type ``kind`` in a chain of ``.strategy`` wrappers, if any."""
    return next((s for s in strategies.wrapper_chain(strategy) if isinstance(s, kind)), None)
