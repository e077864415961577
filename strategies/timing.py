"""TimedStrategy: the seconds a strategy spends per round, to price the wrappers around it.

fedmm times the user's strategy (innermost) and the whole chain (outermost);
the difference is what its wrappers cost per round (decoding, validation,
multipliers, accounting), recorded as ``wrapper-seconds``. No client obligation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

T = TypeVar("T")


class TimedStrategy(StrategyWrapper):
    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self.seconds: dict[int, float] = {}  # round -> seconds in configure/aggregate, train and evaluate

    def _timed(self, server_round: int, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.seconds[server_round] = self.seconds.get(server_round, 0.0) + time.perf_counter() - start

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # materialised here: a lazy iterable would run its work outside the timer
        return self._timed(server_round, lambda: list(self.strategy.configure_train(server_round, arrays, config, grid)))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        return self._timed(server_round, lambda: self.strategy.aggregate_train(server_round, replies))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._timed(server_round,
                           lambda: list(self.strategy.configure_evaluate(server_round, arrays, config, grid)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        return self._timed(server_round, lambda: self.strategy.aggregate_evaluate(server_round, replies))
