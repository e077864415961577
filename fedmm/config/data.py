"""Run-config keys of one concern: the dataset and how it is split over clients (fedmm.data).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .declare import (
    ConfigError,
    fraction,
    key,
    one_of,
    open_fraction,
    positive,
)

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")


@dataclass(frozen=True)
class DataSettings:
    """The dataset and how it is split over clients (fedmm.data)."""

    dataset: str = key("digits", "'digits' (bundled) or a path to a CSV/JSONL manifest")
    partitioner: str = key("dirichlet", "how client data is split", one_of(*PARTITIONERS))
    dirichlet_alpha: float = key(0.3, "Dirichlet concentration (smaller = more label skew)", positive)
    classes_per_client: int = key(2, "classes per client for the pathological partitioner", positive)
    test_fraction: float = key(0.2, "per-client held-out fraction", open_fraction)
    group_sites: float = key(
        0.3,
        "fraction of clients holding the minority group(s) of the 'group' column (the others hold only the "
        "majority group); 1 = every group spread like the labels",
        fraction,
    )

    def _check_data(self) -> None:
        if self.dataset != "digits" and not Path(self.dataset).expanduser().is_file():
            raise ConfigError(f"run-config 'dataset': manifest file not found: {self.dataset}")
