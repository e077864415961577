"""Run-config keys of one concern: rounds, the strategy, sampling (or the asynchronous loop's buffer and
concurrency), and what the server does with updates it distrusts (strategies/).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Any

from ..asynchrony import parse_staleness
from ..faults import parse_faults
from .declare import (
    ConfigError,
    accepts,
    fraction,
    key,
    non_negative,
    parses,
    positive,
)


@accepts(">= 0, finite")
def _finite_non_negative(v: Any) -> str | None:
    return non_negative(v) or (None if math.isfinite(v) else "must be finite")


@dataclass(frozen=True)
class FederationSettings:
    """Rounds, the strategy, sampling, and what the server does with updates it distrusts (strategies/)."""

    num_server_rounds: int = key(10, "federated rounds (asynchronous: aggregations of buffer-size updates)",
                                 positive)
    strategy: str = key("fedavg", "aggregation strategy name (`fedmm strategies` lists them)")
    strategy_args: str = key(
        "", "the strategy's own constructor arguments, e.g. \"eta=0.01 beta_1=0.9\" (Flower k=v syntax)"
    )
    fraction_train: float = key(1.0, "fraction of nodes sampled for training", fraction)
    fraction_evaluate: float = key(1.0, "fraction of nodes sampled for federated evaluation", fraction)
    min_nodes: int = key(2, "minimum nodes per round (train and evaluate)", positive)
    round_timeout: float = key(600.0, "seconds to wait for replies in a round", positive)
    max_update_norm_ratio: float = key(
        10.0, "drop updates whose norm exceeds this x the round's median (0 = off; off under central DP, whose "
              "wrapper clips each update itself: a drop there would let one client decide whether a round is "
              "released)", non_negative)
    update_norm_bound: float = key(
        0.0, "clip every update to this L2 norm before aggregation (0 = off)", non_negative)
    inject_faults: str = key(
        "", "tests and benchmarks: misbehaving clients, e.g. \"crash=0.1,scale=0.2\" "
            "(kinds: crash, timeout, nan, signflip, scale, noise)",
        parses(parse_faults, "kind=probability, comma-separated"))
    asynchronous: bool = key(False, "buffered asynchronous aggregation (FedBuff; server/asynchronous.py) instead "
                                    "of synchronous rounds")
    buffer_size: int = key(4, "asynchronous: updates per aggregation (K)", positive)
    concurrency: int = key(0, "asynchronous: clients kept training at once (0 = every node)", non_negative)
    distinct_clients: bool = key(
        False, "asynchronous: each aggregation takes at most one update per client, and a client whose update "
               "waits is not dispatched again (always so under central DP: one update per client per release). "
               "Off by default: FedBuff lets a fast client contribute as often as it finishes, for throughput",
    )
    staleness: str = key("polynomial a=0.5", "asynchronous: weight of an update by its staleness tau: constant, "
                                             "'polynomial a=A' ((tau+1)^-A), 'hinge a=A b=B'",
                         parses(parse_staleness, "constant | polynomial a=A | hinge a=A b=B"))
    delay_compensation: float = key(0.0, "asynchronous: DC-ASGD's lambda of the first-order correction of a stale "
                                         "update, delta - lambda delta*delta*(theta_now - theta_sent), held to "
                                         "the update's norm (0 = off)", _finite_non_negative)

    def sampled_per_round(self, num_nodes: int) -> int:
        """Updates per aggregation: nodes per training round, as Flower's FedAvg samples them, or asynchronous
        aggregation's buffer size."""
        if self.asynchronous:
            return self.buffer_size
        return max(int(num_nodes * self.fraction_train), self.min_nodes)

    def _check_asynchrony(self) -> None:
        """Rules over this group's keys alone; pairings with other groups' keys: ``settings.py``."""
        if not self.asynchronous:
            return
        if self.fraction_train < 1.0:
            raise ConfigError(f"run-config 'fraction-train' = {self.fraction_train} with 'asynchronous': the "
                              "asynchronous loop samples no cohort, it keeps 'concurrency' clients busy; set that")
        if self.concurrency and self.buffer_size > self.concurrency:
            raise ConfigError(f"run-config 'buffer-size' = {self.buffer_size} > 'concurrency' = {self.concurrency}: "
                              "the buffer could fill only from the same clients' repeated updates")

    @property
    def fault_fractions(self) -> dict[str, float]:
        return parse_faults(self.inject_faults)
