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
    parses,
    positive,
)

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")


@dataclass(frozen=True)
class DataSettings:
    """The dataset and how it is split over clients (fedmm.data)."""

    dataset: str = key("digits", "'digits' (bundled) or a path to a CSV/JSONL manifest; in simulation every "
                       "client's, in deployment the default of a SuperNode whose node config names no 'dataset'")
    classes: str = key("", "the federation's class names, comma-separated (or '@file', one per line, inlined by "
                       "'fedmm run'/'fedmm submit'): every site's labels are looked up in it and prompts come from "
                       "it; '' = the dataset's own labels (required when SuperNodes bring their own data)",
                       parses(lambda v: name_list(v, "classes"), "names, comma-separated, or @file"))
    groups: str = key("", "the protected groups' names, comma-separated (or '@file'), as 'classes' for the "
                      "'group' column; '' = the dataset's own values",
                      parses(lambda v: name_list(v, "groups"), "names, comma-separated, or @file"))
    server_dataset: str = key("", "the server's own held-out manifest (all its rows); '' = the 'server' split of "
                              "'dataset'")
    public_dataset: str = key("", "the public manifest (base pretraining, public negatives and captions; all its "
                              "rows); '' = the 'public' split of 'dataset'")
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

    @property
    def class_list(self) -> tuple[str, ...]:
        return name_list(self.classes, "classes")

    @property
    def group_list(self) -> tuple[str, ...]:
        return name_list(self.groups, "groups")

    def _check_server_files(self) -> None:
        """The manifests the server opens (a site that brings its own data never opens 'dataset'; a client
        opens 'public-dataset' only to draw public pairs, and says so if it is missing)."""
        _check_manifest("dataset", "" if self.dataset == "digits" else self.dataset)
        _check_manifest("server-dataset", self.server_dataset)
        _check_manifest("public-dataset", self.public_dataset)


def _check_manifest(name: str, path: str) -> None:
    if path and not Path(path).expanduser().is_file():
        raise ConfigError(f"run-config '{name}': manifest file not found: {path}")


def name_list(value: str, key_name: str) -> tuple[str, ...]:
    """A comma-separated list of distinct names ('' = none); '@file' must have been inlined by the CLI."""
    if value.startswith("@"):
        raise ValueError(f"'{value}' names a file: 'fedmm run' and 'fedmm submit' inline it (one name per line); "
                         f"pass the names themselves otherwise")
    names = tuple(n.strip() for n in value.split(",")) if value.strip() else ()
    if any(not n for n in names):
        raise ValueError("has an empty name (two commas in a row, or a trailing comma)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"names {repeated} more than once")
    return names


def inline_name_file(value: str, key_name: str) -> str:
    """``'@file'`` -> its names (one per line, blank lines and '#' comments skipped), comma-joined."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    if not path.is_file():
        raise ConfigError(f"run-config '{key_name}' = '{value}': file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    bad = [n for n in names if "," in n]
    if bad:
        raise ConfigError(f"run-config '{key_name}': {path}: names may not contain commas: {bad[:3]}")
    return ",".join(names)
