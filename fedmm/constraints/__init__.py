"""Fairness and toxicity: measured (``metrics``), flagged (``toxicity``), constrained (``objective``).

One entry point per side: clients add a ``ConstraintTerm`` to their loss with
the multipliers the server sent; the server moves each multiplier with
``dual_ascent`` on ``constraint_values`` of the summed client statistics
(strategies/constraints.py wraps that around any strategy).
"""

from .metrics import (
    FAIRNESS_KEYS,
    TOXIC_COUNT_KEYS,
    TOXICITY_KEYS,
    fairness_counts,
    fairness_from_counts,
    group_fairness,
    toxic_retrieval,
    toxic_retrieval_counts,
    toxicity_from_counts,
)
from .objective import (
    CONSTRAINTS,

    ConstraintTerm,
    constraint_values,
    dual_ascent,
    soft_group_gap,
    toxic_mass,
)
from .toxicity import flag_toxic, toxicity_scores

__all__ = [
    "CONSTRAINTS",
    "ConstraintTerm",
    "FAIRNESS_KEYS",

    "TOXICITY_KEYS",
    "TOXIC_COUNT_KEYS",
    "constraint_values",
    "dual_ascent",
    "fairness_counts",
    "fairness_from_counts",
    "flag_toxic",
    "group_fairness",
    "soft_group_gap",
    "toxic_mass",
    "toxic_retrieval",
    "toxic_retrieval_counts",
    "toxicity_from_counts",
    "toxicity_scores",
]
