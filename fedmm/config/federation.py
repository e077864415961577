"""Run-config keys of one concern: rounds, the strategy, sampling, and what the server does with updates it distrusts (strategies/).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..faults import parse_faults
from .declare import (
    fraction,
    key,
    non_negative,
    parses,
    positive,
)


@dataclass(frozen=True)
class FederationSettings:
    """Rounds, the strategy, sampling, and what the server does with updates it distrusts (strategies/)."""

    num_server_rounds: int = key(10, "federated rounds", positive)
    strategy: str = key("fedavg", "aggregation strategy name (`fedmm strategies` lists them)")
    strategy_args: str = key(
        "", "the strategy's own constructor arguments, e.g. \"eta=0.01 beta_1=0.9\" (Flower k=v syntax)"
    )
    fraction_train: float = key(1.0, "fraction of nodes sampled for training", fraction)
    fraction_evaluate: float = key(1.0, "fraction of nodes sampled for federated evaluation", fraction)
    min_nodes: int = key(2, "minimum nodes per round (train and evaluate)", positive)
    round_timeout: float = key(600.0, "seconds to wait for replies in a round", positive)
    max_update_norm_ratio: float = key(
        10.0, "drop updates whose norm exceeds this x the round's median (0 = off)", non_negative)
    update_norm_bound: float = key(
        0.0, "clip every update to this L2 norm before aggregation (0 = off)", non_negative)
    inject_faults: str = key(
        "", "tests and benchmarks: misbehaving clients, e.g. \"crash=0.1,scale=0.2\" "
            "(kinds: crash, timeout, nan, signflip, scale, noise)", parses(parse_faults))

    def sampled_per_round(self, num_nodes: int) -> int:
        """Nodes per training round, as Flower's FedAvg samples them."""
        return max(int(num_nodes * self.fraction_train), self.min_nodes)

    @property
    def fault_fractions(self) -> dict[str, float]:
        return parse_faults(self.inject_faults)
