"""Run-config keys of one concern: fairness and toxicity constraints (fedmm.constraints, strategies/constraints.py).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import protocol
from .declare import (
    accepts,
    key,
    positive,
    unit_interval,
)

@accepts(", ".join(protocol.CONSTRAINTS) + ", comma-separated; or empty")
def _constraint_list(v: Any) -> str | None:
    bad = [p.strip() for p in v.split(",") if p.strip() and p.strip() not in protocol.CONSTRAINTS]
    return f"unknown constraint(s) {', '.join(bad)}; known: {', '.join(protocol.CONSTRAINTS)}" if bad else None


@dataclass(frozen=True)
class ConstraintSettings:
    """Fairness and toxicity constraints (fedmm.constraints, strategies/constraints.py)."""

    constraints: str = key(
        "",
        "constraints training must honour, comma-separated: group-gap (zero-shot accuracy gap between groups "
        "<= max-group-gap), toxicity (toxic top-1 retrieval rate <= max-toxic-rate); empty = none (still measured)",
        _constraint_list,
    )
    max_group_gap: float = key(0.05, "threshold of the group-gap constraint", unit_interval)
    max_toxic_rate: float = key(0.01, "threshold of the toxicity constraint", unit_interval)
    dual_step_group_gap: float = key(5.0, "dual ascent step of the group-gap multiplier (lambda)", positive)
    dual_step_toxicity: float = key(5.0, "dual ascent step of the toxicity multiplier (mu)", positive)

    @property
    def constraint_list(self) -> list[str]:
        return list(dict.fromkeys(p.strip() for p in self.constraints.split(",") if p.strip()))

    @property
    def constraint_limits(self) -> dict[str, tuple[float, float]]:
        """constraint -> (threshold, dual step), for the constraints the run enforces."""
        limits = {"group-gap": (self.max_group_gap, self.dual_step_group_gap),
                  "toxicity": (self.max_toxic_rate, self.dual_step_toxicity)}
        return {name: limits[name] for name in self.constraint_list}
