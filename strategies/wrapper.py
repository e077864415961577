"""StrategyWrapper: the pass-through base of fedmm's strategy wrappers.

A wrapper holds the strategy it wraps in ``self.strategy`` (what
``strategies.innermost`` walks; server/chain.py names each part once it is
built) and hands every call on unchanged; subclasses override only the steps they change
(compression decodes replies, constraints add multipliers, local DP adds its
parameters to the train config).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmm import protocol
from fedmm.strategy_registry import innermost


class ReportsRoundStats(Protocol):
    """A part of the chain that measures something per round: the report's keys and values for a round."""

    def round_stats(self, server_round: int) -> dict[str, float]: ...


class StrategyWrapper(Strategy):
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    @property
    def arrays_key(self) -> str:
        """The record key the user's strategy reads the arrays of a reply from (fedmm sets it to the protocol's)."""
        return getattr(innermost(self.strategy), "arrayrecord_key", protocol.ARRAYS)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
