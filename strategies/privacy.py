"""Client-level differential privacy around a strategy: central, local, distributed.

``make_private`` (the server's one entry point; the client's is
``clients/privacy_mod.py``) wraps a strategy for the run's ``dp`` mode and
returns the ledger that accounts it:

- ``central-server``: Flower's ``DifferentialPrivacyServerSideFixedClipping``
  (the server clips each update to C, averages, adds N(0, (sigma C / n)^2)).
- ``central-client``: Flower's ``DifferentialPrivacyClientSideFixedClipping``;
  client obligation: clip the update to C (fedmm's ``privacy_mod`` runs
  Flower's ``fixedclipping_mod`` when the config carries the clipping norm).
- ``distributed``: ``DistributedSkellam`` below, only under secure
  aggregation; client obligation: clip to C and add a Skellam share of the
  integer noise inside the masked sum, so any t contributors carry the
  noise of the accounted mechanism. The server never adds noise and never
  sees an update: private against the server too.
- ``local``: ``LocalUpdatePrivacy`` below; client obligation: clip to C, add
  N(0, sigma^2 C^2) and keep its own ledger (``privacy_mod``): each update is
  private on its own, against anyone.

Central releases are accounted with Flower's RDP accountant, client-level
(add/remove one client), distributed ones with the Skellam RDP bound
(fedmm.secagg), both with no amplification from client sampling claimed.
They need equal client weights and a uniform-mean aggregate (FedAvg's
``aggregate_train``): the noise is calibrated to sensitivity C / n. A central
round in which fewer than the sampled clients reply is not released
(Flower's strict check): the accountant's event would not match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore import log
from flwr.supercore.privacy_accounting import PrivacySpent

from fedmm import protocol
from fedmm.config import Settings
from fedmm.privacy.accounting import client_level_accountant
from fedmm.privacy.plan import needs_uniform_mean
from fedmm.secagg.plan import SecAggPlan
from strategies.wrapper import StrategyWrapper

Ledger = Callable[[], Any]  # privacy_spent() of Flower's accounted DP wrappers


def check_uniform_mean(strategy: Strategy, dp: str) -> None:
    """Central/distributed DP calibrate noise to a uniform mean: refuse other aggregates."""
    if not needs_uniform_mean(dp):
        return
    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise ValueError(
            f"run-config 'dp' = '{dp}': the noise is calibrated to a uniform mean of clipped updates "
            f"(FedAvg's aggregate); strategy '{type(strategy).__name__}' aggregates otherwise. "
            "Use strategy fedavg or fedprox, or dp = local / dp-sgd, which compose with any strategy"
        )


class DistributedSkellam(StrategyWrapper):
    """Distributed DP: the clients' Skellam shares, summed under secure aggregation, are the mechanism.

    Client obligation: fedmm's ``privacy_mod`` (clip to C, its floor against sigma / sqrt(t)) and
    ``secagg_mod`` (the integer encoding with the noise share the round's code announces, which it checks
    against the multiplier and shares asked for here). Sits beneath ``SecureAggregation``: every reply it
    sees carries the contributors' mean, in which any t of them put noise of variance (sigma Delta_2)^2 in
    integer units. Each round with a released sum is one Skellam release (fedmm.secagg.plan), composed by
    RDP; no amplification from client sampling claimed. A round that would exceed ``max-epsilon`` releases
    nothing (the plan stops the run before it: fedmm/privacy/plan.py).
    """

    def __init__(self, strategy: Strategy, plan: SecAggPlan, delta: float, max_epsilon: float) -> None:
        super().__init__(strategy)
        self.plan, self.delta, self.max_epsilon = plan, delta, max_epsilon
        self.released: list[int] = []  # the rounds whose sum was released
        self._dim: int | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> Distributed DP (Skellam, under secure aggregation): noise multiplier %s, clipping norm "
            "%s, threshold %d", self.plan.noise_multiplier, self.plan.clip, self.plan.threshold)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._dim = protocol.trainable_size(arrays)
        config[protocol.DP_MODE] = "distributed"
        config[protocol.DP_CLIP_NORM] = self.plan.clip
        config[protocol.DP_NOISE_MULTIPLIER] = self.plan.noise_multiplier
        config[protocol.DP_NOISE_SHARES] = self.plan.threshold
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if any(not r.has_error() for r in replies) and self.max_epsilon > 0:
            planned = self.epsilon(len(self.released) + 1)
            if planned > self.max_epsilon:
                log(WARNING, "round %d: released nothing: epsilon would reach %.4f > max-epsilon %g",
                    server_round, planned, self.max_epsilon)
                return None, None
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.released.append(server_round)
            log(INFO, "Privacy spent: epsilon=%.6f at delta=%g after %d releases (Skellam)",
                self.epsilon(len(self.released)), self.delta, len(self.released))
        return arrays, metrics

    def epsilon(self, releases: int) -> float:
        if self._dim is None:
            return 0.0
        return self.plan.epsilon(self._dim, releases, self.delta)

    def privacy_spent(self) -> PrivacySpent:
        return PrivacySpent(self.epsilon(len(self.released)), self.delta, len(self.released), "skellam-rdp")


class LocalUpdatePrivacy(StrategyWrapper):
    """Local DP: asks every client to clip its update to C and add N(0, sigma^2 C^2).

    Client obligation: fedmm's ``privacy_mod``, which computes the noise and
    its own epsilon ledger from the multiplier it actually uses, declines a
    request below its node's floor, and declines to train once its budget (the
    smaller of the server's ``max-epsilon`` and its own) would be exceeded.
    Aggregation is the wrapped strategy's, unchanged (the updates
    are already private: anything after is post-processing).
    """

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 delta: float, max_epsilon: float) -> None:
        super().__init__(strategy)
        self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm
        self.delta, self.max_epsilon = delta, max_epsilon

    def summary(self) -> None:
        log(INFO, "\t├──> Local DP: noise multiplier %s, clipping norm %s", self.noise_multiplier, self.clipping_norm)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # the client derives its noise and its ledger from sigma, and holds them to its own floor
        config[protocol.DP_MODE] = "local"
        config[protocol.DP_CLIP_NORM] = self.clipping_norm
        config[protocol.DP_NOISE_MULTIPLIER] = self.noise_multiplier
        config[protocol.DP_DELTA] = self.delta
        config[protocol.DP_MAX_EPSILON] = self.max_epsilon
        return self.strategy.configure_train(server_round, arrays, config, grid)


def make_private(strategy: Strategy, settings: Settings, num_nodes: int | None,
                 secagg: SecAggPlan | None = None) -> tuple[Strategy, Ledger | None]:
    """The server's one privacy entry point: ``strategy`` wrapped for the run's ``dp`` mode, and its ledger.

    The ledger is the accounting wrapper's ``privacy_spent`` (central and distributed modes), None where the
    server accounts nothing (none; dp-sgd and local: each client keeps its own). ``num_nodes`` (the
    federation's size) sizes the accountant; None only checks that the mode can wrap ``strategy``.
    ``secagg``: the run's secure-aggregation plan, which distributed DP's mechanism is part of.
    """
    dp = settings.dp
    if dp in ("none", "dp-sgd"):
        return strategy, None
    if dp == "local":
        return LocalUpdatePrivacy(strategy, settings.dp_noise_multiplier, settings.dp_clip_norm,
                                  settings.dp_delta, settings.max_epsilon), None
    check_uniform_mean(strategy, dp)
    if num_nodes is None:
        return strategy, None
    if dp == "distributed":
        if secagg is None:
            raise ValueError("dp = 'distributed' needs secure aggregation's plan")
        private = DistributedSkellam(strategy, secagg, settings.dp_delta, settings.max_epsilon)
        return private, private.privacy_spent
    accountant = client_level_accountant(settings.dp_delta, num_nodes, settings.max_epsilon or None)
    wrapper = {
        "central-server": DifferentialPrivacyServerSideFixedClipping,
        "central-client": DifferentialPrivacyClientSideFixedClipping,
    }[dp]
    clipped = wrapper(strategy, settings.dp_noise_multiplier, settings.dp_clip_norm,
                      settings.sampled_per_round(num_nodes), accountant=accountant)
    return clipped, clipped.privacy_spent
