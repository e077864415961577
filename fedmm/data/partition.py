"""Client partitions through flwr-datasets partitioners, on local datasets.

``group_sites`` < 1 concentrates the minority group(s) on a few clients, as
in real federations (one hospital's old scanner, one region's dialect): the
majority group is split over all clients and the other groups over a seeded
``group_sites`` fraction of them, each with the same partitioner kind.
flwr-datasets partitions by one column only, hence the two passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
    Partitioner,
)

if TYPE_CHECKING:
    from ..config import Settings


def make_partitioner(
    kind: str,
    num_partitions: int,
    *,
    alpha: float = 0.3,
    classes_per_client: int = 2,
    seed: int = 0,
) -> Partitioner:
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"run-config 'dirichlet-alpha' must be > 0, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=2,
            self_balancing=False,
            seed=seed,
        )
    if kind == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="deterministic",
            seed=seed,
        )
    if kind == "natural":
        return NaturalIdPartitioner(partition_by="client")
    raise ValueError(f"run-config 'partitioner': unknown '{kind}'")


def partition(
    dataset: Dataset,
    kind: str,
    partition_id: int,
    num_partitions: int,
    *,
    alpha: float = 0.3,
    classes_per_client: int = 2,
    test_fraction: float = 0.2,
    group_sites: float = 1.0,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """The (train, test) split of one client's partition."""
    part = partition_rows(dataset, kind, partition_id, num_partitions, alpha=alpha,
                          classes_per_client=classes_per_client, group_sites=group_sites, seed=seed)
    return hold_out(part, test_fraction, seed)


def hold_out(part: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test) of one client's rows: a seeded ``test_fraction`` held out (nothing with fewer than 2 rows)."""
    if len(part) < 2:
        return part, part.select([])
    split = part.train_test_split(test_size=test_fraction, seed=seed)
    return split["train"], split["test"]


def partition_rows(
    dataset: Dataset,
    kind: str,
    partition_id: int,
    num_partitions: int,
    *,
    alpha: float = 0.3,
    classes_per_client: int = 2,
    group_sites: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """One client's partition, before its held-out split (``fedmm data export`` writes these, in order)."""
    if num_partitions > len(dataset):
        raise ValueError(
            f"num-partitions={num_partitions} exceeds the {len(dataset)} client samples"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} not in [0, {num_partitions})")
    if kind == "natural" and not any(dataset["client"]):
        raise ValueError("partitioner 'natural' needs a non-empty 'client' column in the data")

    def load(data: Dataset, pid: int, num: int) -> Dataset:
        p = make_partitioner(kind, num, alpha=alpha, classes_per_client=classes_per_client, seed=seed)
        p.dataset = data
        if kind == "natural" and p.num_partitions != num:
            raise ValueError(f"the data has {p.num_partitions} distinct clients but num-partitions={num}")
        return p.load_partition(pid)

    groups = np.asarray(dataset["group"])
    values, counts = np.unique(groups, return_counts=True)
    if kind == "natural" or group_sites >= 1.0 or len(values) < 2:
        part = load(dataset, partition_id, num_partitions)
    else:
        majority = values[counts.argmax()]
        sites = minority_sites(num_partitions, group_sites, seed)
        labels = np.asarray(dataset["label"])

        def rows_of(mask: np.ndarray, pid: int, num: int) -> list[int]:
            # a two-column stand-in: all a label partitioner reads, and no index-flattening of the images
            rows = np.flatnonzero(mask)
            return list(load(Dataset.from_dict({"label": labels[rows], "_row": rows}), pid, num)["_row"])

        rows = rows_of(groups == majority, partition_id, num_partitions)
        if partition_id in sites:
            rows += rows_of(groups != majority, sites.index(partition_id), len(sites))
        part = dataset.select(rows)
    return part


def minority_sites(num_partitions: int, group_sites: float, seed: int) -> list[int]:
    """The partition ids that hold the minority group(s): a seeded ``group_sites`` fraction (at least one)."""
    k = max(1, round(group_sites * num_partitions))
    return sorted(np.random.default_rng(seed).choice(num_partitions, size=k, replace=False).tolist())


def client_partition(settings: Settings, dataset: Dataset, partition_id: int, num_partitions: int) -> Dataset:
    """``partition_rows`` with the run's partitioning settings."""
    s = settings
    return partition_rows(dataset, s.partitioner, partition_id, num_partitions, alpha=s.dirichlet_alpha,
                          classes_per_client=s.classes_per_client, group_sites=s.group_sites, seed=s.seed)


def client_split(settings: Settings, dataset: Dataset, partition_id: int, num_partitions: int) -> tuple[Dataset, Dataset]:
    """What client ``partition_id`` trains and tests on under the run's partitioning settings."""
    return hold_out(client_partition(settings, dataset, partition_id, num_partitions), settings.test_fraction,
                    settings.seed)


def site_split(settings: Settings, dataset: Dataset) -> tuple[Dataset, Dataset]:
    """A site's own rows as (train, test): held out as ``partition`` holds out a partition's, so a site whose
    folder holds exactly partition i's rows (``fedmm data export``) trains and tests on what partition i would."""
    return hold_out(dataset, settings.test_fraction, settings.seed)


def train_sizes(settings: Settings, dataset: Dataset, num_partitions: int) -> list[int]:
    """Training examples of every client, by partition id."""
    return [len(client_split(settings, dataset, pid, num_partitions)[0]) for pid in range(num_partitions)]
