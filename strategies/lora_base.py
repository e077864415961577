"""Shared machinery of the LoRA-aware strategies (HetLoRA, FLoRA, SVDLoRA).

Each is Flower's FedAvg (sampling, reply checks, metric aggregation) with its
own ``combine``: how the clients' A/B factors become the next global ones.
Arrays that are not LoRA factors are weighted-averaged as FedAvg would.

Clients must: reply with ``arrays`` (the adapter, zero-padded to the global
rank if their own is lower), the ``weighted_by_key`` count, and ``lora-rank``
(their rank) in the metrics; apply downlink-only frozen updates
(``lora_factors.DOWNLINK_ONLY`` keys) to their base weights. fedmm's ClientApp
does all of this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmm import protocol
from fedmm.protocol import LORA_RANK as RANK_METRIC
from fedmm.protocol import to_numpy, to_record
from strategies import lora_factors as lf


class LoRAFactorStrategy(FedAvg):
    """FedAvg whose aggregation of LoRA factors is ``combine`` (subclasses)."""

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = protocol.NUM_EXAMPLES,
        arrayrecord_key: str = protocol.ARRAYS,
        configrecord_key: str = protocol.CONFIG,
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.current: OrderedDict[str, np.ndarray] | None = None  # the global arrays last sent
        self.init_state()

    def init_state(self) -> None:
        """Subclasses set up their own aggregation state here."""

    @property
    def last_sent(self) -> OrderedDict[str, np.ndarray]:
        """The global arrays of the last configure_train (RuntimeError before the first)."""
        if self.current is None:
            raise RuntimeError("no global arrays sent yet: configure_train comes first")
        return self.current

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.current is None:
            return None, None
        contents = [m.content for m in valid]
        arrays = [to_numpy(protocol.arrays_in(c, self.arrayrecord_key)) for c in contents]
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        weights = [protocol.number(m, self.weighted_by_key) for m in metrics]
        ranks = [protocol.integer(m, RANK_METRIC) for m in metrics]  # the wire states it (ReplyCheck requires it), never inferred
        # components beyond a client's rank are its padding: exactly zero, whatever a lossy codec made of them
        arrays = [lf.zero_beyond_rank(a, r) for a, r in zip(arrays, ranks)]
        trainable = [k for k in self.current if not lf.is_downlink_only(k)]
        layers = lf.lora_layers(trainable)
        factor_keys = {layer + s for layer in layers for s in (lf.A_SUFFIX, lf.B_SUFFIX)}
        new: OrderedDict[str, np.ndarray] = OrderedDict()
        for key in trainable:
            if key not in factor_keys:
                new[key] = lf.weighted_mean(arrays, weights, key)
        new.update(self.combine(arrays, weights, ranks, layers))
        ordered = OrderedDict((k, new[k]) for k in [*trainable, *[k for k in new if k not in trainable]])
        return to_record(lf.cast_like(ordered, self.current)), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def combine(
        self, arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], ranks: Sequence[int],
        layers: Sequence[str],
    ) -> Mapping[str, np.ndarray]:
        raise NotImplementedError

