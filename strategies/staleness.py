"""StalenessWeighting: asynchronous aggregation's staleness weights and delay compensation, per buffered reply.

Client obligation: none (the same ClientApp as a synchronous run). The
asynchronous loop (server/asynchronous.py) hands the chain one buffer of
replies at a time and tells this wrapper, per reply, its staleness tau and the
global version the client trained on (``expect``). The codec above decoded
each reply's update against the current global (a client's update is
local - the global it received, so it is rebased onto the current one), and
validation checked it; here each update delta becomes

- delta' = delay_compensated(delta) (DC-ASGD, ``delay-compensation`` > 0), and
- its weight w * s(tau) under ``aggregation-weight``, the key the user's
  strategy weights its mean by: theta + sum w s delta' / sum w s.

Under central DP (a uniform mean, noise calibrated to C / K) reweighting would
give one update more than 1/K of the mean; the staleness weight then scales
the update instead (s delta', s <= 1), which keeps every clipped update's
share within C / K. Error replies pass through untouched.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedmm import protocol
from fedmm.asynchrony import Staleness, delay_compensated
from fedmm.protocol import to_numpy, to_record, trainable
from strategies.wrapper import StrategyWrapper


class StalenessWeighting(StrategyWrapper):
    def __init__(self, strategy: Strategy, staleness: Staleness, delay_compensation: float = 0.0,
                 uniform_mean: bool = False) -> None:
        super().__init__(strategy)
        self.staleness, self.lam, self.uniform_mean = staleness, delay_compensation, uniform_mean
        self.key = self.arrays_key
        self._reference: OrderedDict[str, np.ndarray] | None = None
        self._expected: dict[str, tuple[int, int, Mapping[str, np.ndarray]]] = {}
        self.stats: dict[int, dict[str, float]] = {}  # aggregation -> staleness mean / max, weight mean

    def summary(self) -> None:
        log(INFO, "\t├──> StalenessWeighting: s = %s%s, delay compensation %s", self.staleness.spec,
            " (scales each update: uniform mean under DP)" if self.uniform_mean else "", self.lam or "off")
        self.strategy.summary()

    def expect(self, reply_id: str, staleness: int, version: int, trained_on: Mapping[str, np.ndarray]) -> None:
        """The loop's word on one reply of the next aggregation: its tau, and the global it trained on."""
        self._expected[reply_id] = (staleness, version, trained_on)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = trainable(to_numpy(arrays))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._reference is None:
            raise RuntimeError("aggregate_train before configure_train")
        ref, kept, taus, weights = self._reference, [], [], []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            expected = self._expected.pop(msg.metadata.message_id, None)
            if expected is None:  # the loop annotates every reply it buffers: anything else is not its to apply
                raise RuntimeError(f"reply {msg.metadata.message_id} of node {msg.metadata.src_node_id} reached "
                                   "the staleness weighting without the loop's annotation")
            tau, version, trained_on = expected
            s = self.staleness.weight(tau)
            local = to_numpy(protocol.arrays_in(msg.content, self.key))
            delta = OrderedDict((k, local[k] - ref[k]) for k in ref)
            if tau > 0:
                delta = delay_compensated(delta, ref, trained_on, self.lam)
            metrics = protocol.metrics_in(msg.content)
            if self.uniform_mean:
                delta = OrderedDict((k, (s * d).astype(d.dtype)) for k, d in delta.items())
            else:
                metrics[protocol.AGGREGATION_WEIGHT] = protocol.number(metrics, protocol.NUM_EXAMPLES) * s
            metrics[protocol.STALENESS] = tau
            metrics[protocol.TRAINED_ON] = version
            msg.content[self.key] = to_record(OrderedDict((k, ref[k] + delta[k]) for k in ref))
            kept.append(msg)
            taus.append(tau)
            weights.append(s)
        self._expected.clear()  # annotations of replies an outer wrapper dropped
        if taus:
            self.stats[server_round] = {"staleness-mean": float(np.mean(taus)), "staleness-max": float(max(taus)),
                                        "staleness-weight-mean": float(np.mean(weights))}
        return self.strategy.aggregate_train(server_round, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:  # the key the strategy weights by: an evaluation is weighted by its examples
            if not msg.has_error():
                metrics = protocol.metrics_in(msg.content)
                metrics[protocol.AGGREGATION_WEIGHT] = protocol.number(metrics, protocol.NUM_EXAMPLES)
        return self.strategy.aggregate_evaluate(server_round, replies)
