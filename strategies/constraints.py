"""DualAscentConstraints: fairness and toxicity constraints around any strategy.

Client obligation: when the train config carries ``multiplier-<constraint>``
(``fedmm.protocol.multiplier_key``), add ``multiplier * surrogate`` to the
local loss (``fedmm.constraints.ConstraintTerm``) and reply with the
constraint statistics it counted (``cstat-*`` metrics: per-group correct and
total zero-shot predictions, toxic top-1 retrievals and images).

After each round the wrapper sums those statistics over the replies, measures
each constraint (``constraint_values``: accuracy gap between groups, toxic
top-1 rate) and takes one projected dual-ascent step per constraint,
multiplier <- max(0, multiplier + step * (measured - threshold)), before the
wrapped strategy aggregates as usual. A round without statistics for a
constraint (no client saw two groups, say) leaves its multiplier unchanged.
The multipliers are strategy state: ``state()`` / ``load_state()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedmm.constraints import constraint_values, dual_ascent
from fedmm.protocol import CONSTRAINTS, CONSTRAINT_STAT, as_number, multiplier_key
from strategies.wrapper import StrategyWrapper


@dataclass(frozen=True)
class Constraint:
    threshold: float  # the largest acceptable measured value
    step: float  # dual ascent step size
    initial: float = 0.0  # starting multiplier


class DualAscentConstraints(StrategyWrapper):
    def __init__(self, strategy: Strategy, constraints: Mapping[str, Constraint]) -> None:
        unknown = set(constraints) - set(CONSTRAINTS)
        if unknown:
            raise ValueError(f"unknown constraint(s) {sorted(unknown)}; known: {', '.join(CONSTRAINTS)}")
        super().__init__(strategy)
        self.constraints = dict(constraints)
        self.multipliers = {name: c.initial for name, c in constraints.items()}
        self.history: dict[int, dict[str, float]] = {}  # round -> measured values and updated multipliers

    def round_stats(self, server_round: int) -> dict[str, float]:
        return dict(self.history.get(server_round, {}))

    def summary(self) -> None:
        log(INFO, "\t├──> DualAscentConstraints: %s", ", ".join(
            f"{n} <= {c.threshold} (step {c.step})" for n, c in self.constraints.items()))
        self.strategy.summary()

    def state(self) -> dict[str, float]:
        return dict(self.multipliers)

    def load_state(self, multipliers: Mapping[str, float]) -> None:
        self.multipliers.update({k: float(v) for k, v in multipliers.items() if k in self.constraints})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        extra = {multiplier_key(name): value for name, value in self.multipliers.items()}
        return self.strategy.configure_train(server_round, arrays, ConfigRecord({**dict(config), **extra}), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        summed: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                continue
            for record in msg.content.metric_records.values():
                for key, value in record.items():
                    if key.startswith(CONSTRAINT_STAT):
                        summed[key] = summed.get(key, 0.0) + as_number(value, key)
        measured = constraint_values(summed)
        row: dict[str, float] = {}
        for name, c in self.constraints.items():
            row[f"constraints/multiplier-{name}"] = self.multipliers[name]  # the one this round trained with
            if name in measured:
                row[f"constraints/{name}"] = measured[name]
                self.multipliers[name] = dual_ascent(self.multipliers[name], measured[name], c.threshold, c.step)
        self.history[server_round] = row
        return self.strategy.aggregate_train(server_round, replies)
