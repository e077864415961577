"""Client-level differential privacy around a strategy: central, local, distributed.

``make_private`` (the server's one entry point; the client's is
``clients/privacy_mod.py``) wraps a strategy for the run's ``dp`` mode and
returns the ledger that accounts it:

- ``central-server``: Flower's ``DifferentialPrivacyServerSideFixedClipping``
  (the server clips each update to C, averages, adds N(0, (sigma C / n)^2)).
- ``central-client``: Flower's ``DifferentialPrivacyClientSideFixedClipping``;
  client obligation: clip the update to C (fedmm's ``privacy_mod`` runs
  Flower's ``fixedclipping_mod`` when the config carries the clipping norm).
- ``distributed``: ``DistributedFixedClipping`` below; client obligation:
  clip to C and add N(0, sigma^2 C^2 / n) itself, so the sum of the n
  updates carries N(0, sigma^2 C^2), the same noise as central DP. The server
  never adds noise. Private against the server only under secure
  aggregation (it must see the sum, not the n noisy terms).
- ``local``: ``LocalUpdatePrivacy`` below; client obligation: clip to C, add
  N(0, sigma^2 C^2) and keep its own ledger (``privacy_mod``): each update is
  private on its own, against anyone.

Central and distributed releases are accounted with Flower's RDP accountant,
client-level (add/remove one client), with no amplification from client
sampling claimed. They need equal client weights and a uniform-mean
aggregate (FedAvg's ``aggregate_train``): the noise is calibrated to
sensitivity C / n. A round in which fewer than the sampled clients reply is
not released (Flower's strict check): the planned noise would be too small
in the distributed case, and the accountant's event would not match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase, validate_replies
from flwr.supercore import log

from fedmm import protocol
from fedmm.config import Settings
from fedmm.privacy.accounting import client_level_accountant
from fedmm.privacy.plan import needs_uniform_mean
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


class DistributedFixedClipping(DifferentialPrivacyFixedClippingBase):
    """Distributed DP: each of the n sampled clients clips to C and adds N(0, sigma^2 C^2 / n).

    Client obligation: fedmm's ``privacy_mod`` (clip -> noise -> encode). The
    mean of n such updates carries noise of std sigma C / n, as central DP's.
    Only private against the server when the sum is computed under secure
    aggregation; without it each update carries just 1/sqrt(n) of the noise.
    """

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Distributed, Client-Side Noise)"

    def summary(self) -> None:
        log(INFO, "\t├──> Distributed DP: noise multiplier %s, clipping norm %s, %d clients per round",
            self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[protocol.DP_MODE] = "distributed"
        config[protocol.DP_CLIP_NORM] = self.clipping_norm
        config[protocol.DP_NOISE_MULTIPLIER] = self.noise_multiplier
        config[protocol.DP_NOISE_SHARES] = self.num_sampled_clients
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return self._prepare_accounting(server_round, messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        event = self._pop_pending_event(server_round)
        if not validate_replies(replies, self.num_sampled_clients, strict=True):
            return None, None  # fewer noise shares than planned: release nothing
        self._validate_uniform_weights(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self._compose_release(event)
        return arrays, metrics


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


def make_private(strategy: Strategy, settings: Settings, num_nodes: int | None) -> tuple[Strategy, Ledger | None]:
    """The server's one privacy entry point: ``strategy`` wrapped for the run's ``dp`` mode, and its ledger.

    The ledger is the accounting wrapper's ``privacy_spent`` (central and distributed modes), None where the
    server accounts nothing (none; dp-sgd and local: each client keeps its own). ``num_nodes`` (the
    federation's size) sizes the accountant; None only checks that the mode can wrap ``strategy``.
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
    accountant = client_level_accountant(settings.dp_delta, num_nodes, settings.max_epsilon or None)
    wrapper = {
        "central-server": DifferentialPrivacyServerSideFixedClipping,
        "central-client": DifferentialPrivacyClientSideFixedClipping,
        "distributed": DistributedFixedClipping,
    }[dp]
    private = wrapper(strategy, settings.dp_noise_multiplier, settings.dp_clip_norm,
                      settings.sampled_per_round(num_nodes), accountant=accountant)
    return private, private.privacy_spent
