"""FedAvg with a server learning rate, as a third-party fedmm strategy.

Clients: nothing beyond FedAvg's obligations (reply with ``arrays`` and the
``weighted_by_key`` count).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class FedAvgServerLR(FedAvg):
    """FedAvg that moves the global arrays only server_lr of the way to the clients' average."""

    def __init__(
        self,
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        train_metrics_aggr_fn=None,
        evaluate_metrics_aggr_fn=None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if not 0.0 <= server_lr <= 1.0:
            raise ValueError(f"server_lr = {server_lr} must be in [0, 1]")
        self.server_lr = server_lr
        self._current: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None or self._current is None:
            return average, metrics
        current = self._current.to_numpy_ndarrays()
        mixed = [c + self.server_lr * (a - c) for c, a in zip(current, average.to_numpy_ndarrays())]
        return _like(average, mixed), metrics


def _like(template: ArrayRecord, arrays: list) -> ArrayRecord:
    """An ArrayRecord with ``template``'s keys, in order, holding ``arrays``."""
    from flwr.app import Array

    return ArrayRecord({key: Array(value) for key, value in zip(template.keys(), arrays)})
