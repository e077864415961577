"""Personalization methods, the server halves: FedAvg on what the clients share; the personal part stays with them.

Ditto (Li et al. 2021). Client obligations (fedmm/methods/ditto.py): train
and return the global adapter as FedAvg's clients do; then train a personal
adapter v, kept on the client, on the loss plus ``ditto-lambda``/2
||v - w||^2 (w: the global adapter received); report ``personal-*``
evaluate metrics of v. The server sends ``ditto-lambda`` (``lam``).

Local heads (FedPer / FedRep style). Client obligations
(fedmm/methods/local_heads.py): train the towers' adapters with its own
projection heads, which never leave it; reply with the adapter only; report
``personal-*`` evaluate metrics with its heads beside the global model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmm import protocol

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord] | None


class Ditto(FedAvg):
    """Ditto: FedAvg on the global adapter; each client keeps a personal adapter pulled towards it by lam."""

    def __init__(self, lam: float = 0.1, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2,
                 weighted_by_key: str = protocol.NUM_EXAMPLES, arrayrecord_key: str = protocol.ARRAYS,
                 configrecord_key: str = protocol.CONFIG, train_metrics_aggr_fn: MetricsAggregation = None,
                 evaluate_metrics_aggr_fn: MetricsAggregation = None) -> None:
        super().__init__(fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
                         weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn,
                         evaluate_metrics_aggr_fn)
        if not 0 <= lam < 1e6:
            raise ValueError(f"Ditto lam = {lam}: must be in [0, 1e6)")
        self.lam = lam

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[protocol.DITTO_LAMBDA] = self.lam
        return super().configure_train(server_round, arrays, config, grid)


class LocalHeads(FedAvg):
    """Local heads (FedPer/FedRep): FedAvg on the towers' adapters; each client's projection heads stay with it."""
