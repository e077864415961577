"""Per-round metrics history, filled by the strategy's metric aggregation hooks.

Flower's ``Result`` keeps only aggregated metrics; the report also needs each
client's numbers. ``MetricsHistory.train_aggr`` / ``evaluate_aggr`` are
passed to the strategy as its ``*_metrics_aggr_fn``: they record every
reply's MetricRecord, then aggregate. Counts (fairness counts per group
and class, toxic-retrieval counts, constraint statistics) are summed, so
federated per-group accuracy, gaps and rates are exact, not averages of
rates; client fairness is the spread of the clients' own accuracies.

Records are filed under the server round: ``RecordsRound``, the outermost
wrapper of the chain, tells the history which round is being aggregated
(the metric hooks themselves get no round number, and are not called at all
in a round that aggregates nothing).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedmm.constraints import fairness_from_counts, toxicity_from_counts
from fedmm import protocol
from strategies.wrapper import StrategyWrapper

_COUNT = re.compile(r"^(fair-(n|pred|tp)-g\d+-c\d+|tox-(top1|mass|images)|cstat-.+)$")  # summed, not averaged


class MetricsHistory:
    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, Any]] = defaultdict(dict)
        self.clients: list[dict[str, Any]] = []  # one row per client reply
        self.server_round = 0  # the round being aggregated (RecordsRound sets it)

    def _record(self, phase: str, replies: list[RecordDict]) -> int:
        rnd = self.server_round
        for rd in replies:
            for rec in rd.metric_records.values():
                self.clients.append({"round": rnd, "phase": phase, **dict(rec)})
        return rnd

    def _aggregate(self, phase: str, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        rnd = self._record(phase, replies)
        counts: dict[str, float] = defaultdict(float)
        maxima: dict[str, float] = {}
        plain = []
        for rd in replies:
            for rec in rd.metric_records.values():
                keep = {}
                for k, v in rec.items():
                    if _COUNT.match(k):
                        counts[k] += protocol.as_number(v, k)
                    elif k.startswith("bytes-"):  # bytes add up; a weighted mean would be meaningless
                        counts[f"{k}-total"] += protocol.as_number(v, k)
                    elif k.startswith(protocol.DP_EPSILON):  # a guarantee is as weak as its weakest client
                        maxima[f"{k}-max"] = max(maxima.get(f"{k}-max", 0.0), protocol.as_number(v, k))
                    else:
                        keep[k] = v
                plain.append(RecordDict({protocol.METRICS: MetricRecord(keep)}))
        agg = dict(aggregate_metricrecords(plain, weight_key)) if plain else {}
        agg.pop(protocol.PARTITION_ID, None)
        agg.pop(protocol.UNIT_WEIGHT, None)
        agg.pop(protocol.AGGREGATION_WEIGHT, None)
        # the weakest client's ledger so far: clients that stopped (budget spent) keep what they spent
        for k, v in maxima.items():
            agg[k] = max([v] + [row[f"{phase}/{k}"] for row in self.rounds.values() if f"{phase}/{k}" in row])
        for k in list(counts):
            if k.startswith("bytes-"):
                agg[k] = counts[k]
                agg[k.removesuffix("-total") + "-per-client"] = counts[k] / max(1, len(replies))
        agg.update(fairness_from_counts(counts))
        agg.update(toxicity_from_counts(counts))
        for prefix in ("", protocol.PERSONAL):  # the global model's, and each client's own model's (methods)
            key = prefix + protocol.ZS_ACC
            accs = [protocol.number(rec, key) for rd in replies for rec in rd.metric_records.values()
                    if key in rec and protocol.number(rec, protocol.NUM_EXAMPLES, 0) > 0]
            if phase == "evaluate" and accs:  # client fairness: how unequal the clients' own accuracies are
                agg[f"{prefix}client-acc-min"], agg[f"{prefix}client-acc-std"] = min(accs), float(np.std(accs))
        agg["num-replies"] = len(replies)
        self.rounds[rnd].update({f"{phase}/{k}": v for k, v in agg.items()})
        return MetricRecord(agg)

    def train_aggr(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        return self._aggregate("train", replies, weight_key)

    def evaluate_aggr(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        return self._aggregate("evaluate", replies, weight_key)

    def at_round(self, server_round: int) -> None:
        """File the next records under ``server_round``."""
        self.server_round = server_round

    def record_central(self, rnd: int, metrics: dict[str, float]) -> None:
        self.rounds[rnd].update({f"central/{k}": v for k, v in metrics.items()})

    def record(self, rnd: int, key: str, value: float) -> None:
        self.rounds[rnd][key] = value

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready history, for the round checkpoint (server/checkpoint.py)."""
        return {"rounds": [[r, row] for r, row in self.rounds.items()], "clients": self.clients}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds.clear()
        self.rounds.update({int(r): dict(row) for r, row in state["rounds"]})
        self.clients = list(state["clients"])


class RecordsRound(StrategyWrapper):
    """Tells ``history`` the server round before each aggregation, so every record lands in its own round."""

    def __init__(self, strategy: Strategy, history: MetricsHistory) -> None:
        super().__init__(strategy)
        self.at_round = history.at_round  # a bound method: the history itself is checkpointed once, on its own

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.at_round(server_round)
        return self.strategy.aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.at_round(server_round)
        return self.strategy.aggregate_evaluate(server_round, replies)
