"""Datasets (bundled digits, user manifests), partitioning, tensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from datasets import Dataset, Value

from .images import ImageFiles
from .digits import CLASS_NAMES, DATA_VERSION, ZERO_SHOT_TEMPLATES, load_digits_splits
from .manifest import ManifestError, ManifestReport, load_manifest
from .partition import client_split, partition, train_sizes

__all__ = [
    "Batch",
    "ManifestError",
    "ManifestReport",
    "class_names",
    "group_names",
    "dataset_version",
    "load_splits",
    "client_split",
    "partition",
    "train_sizes",
    "to_batch",
    "zero_shot_prompts",
]


@lru_cache(maxsize=8)
def load_splits(dataset: str, classes: tuple[str, ...] = (), groups: tuple[str, ...] = ()) -> dict[str, Dataset]:
    """``{'public', 'clients', 'server'}`` splits of 'digits' or a manifest (cached per process).

    ``classes`` / ``groups``: the run's label and group names a manifest's values must belong to.
    """
    if dataset == "digits":
        return load_digits_splits()
    splits, _ = load_manifest(dataset, classes, groups)
    return splits


def dataset_version(dataset: str) -> str:
    return DATA_VERSION if dataset == "digits" else f"manifest:{dataset}"


def class_names(ds: Dataset) -> list[str]:
    return list(ds.features["label"].names)


def group_names(ds: Dataset) -> list[str]:
    """Names of the protected groups: the manifest's (e.g. 'female'), or the ids as text."""
    feature = ds.features["group"]
    if hasattr(feature, "names"):
        return list(feature.names)
    groups = ds["group"]
    return [str(g) for g in range(max(groups) + 1)] if len(groups) else ["0"]


def zero_shot_prompts(names: list[str]) -> list[list[str]]:
    """Per class, several phrasings; the digits' number words get the numeral too."""
    out = []
    for name in names:
        d = CLASS_NAMES.index(name) if name in CLASS_NAMES else name
        out.append([t.format(w=name, d=d) for t in ZERO_SHOT_TEMPLATES])
    return out


@dataclass
class Batch:
    """A dataset as model-ready tensors; a manifest's images stay files until a batch indexes them.

    ``subset`` (what training, evaluation and the DP sampler draw batches with)
    always returns in-memory tensors.
    """

    images: torch.Tensor | ImageFiles  # (N, 3, H, W), normalised; a manifest's files decode per batch
    tokens: torch.Tensor  # (N, context)
    labels: torch.Tensor  # (N,), -1 when unknown
    groups: torch.Tensor  # (N,)
    toxic: torch.Tensor | None = None  # (N,) bool: the caption is toxic (as flagged on the holder's side)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> "Batch":
        toxic = None if self.toxic is None else self.toxic[idx]
        return Batch(self.images[idx], self.tokens[idx], self.labels[idx], self.groups[idx], toxic)

    def same_class(self, other: "Batch") -> torch.Tensor:
        """(len(self), len(other)) bool: pair i of self and pair j of other show the same class.

        Same label when both are labelled, else the same caption tokens (compared on
        the shorter width: a caption that is a padded prefix of another counts as the
        same). Contrastive losses use it to keep same-class pairs out of the negatives.
        """
        labelled = (self.labels[:, None] >= 0) & (other.labels[None, :] >= 0)
        same_label = self.labels[:, None] == other.labels[None, :]
        width = min(self.tokens.shape[1], other.tokens.shape[1])
        same_text = (self.tokens[:, None, :width] == other.tokens[None, :, :width]).all(-1)
        return torch.where(labelled, same_label, same_text)


def to_batch(ds: Dataset, tokenizer, mean, std, size: int, toxic: np.ndarray | None = None) -> Batch:
    """Model-ready tensors of ``ds``; ``toxic`` overrides the dataset's own flags (e.g. a classifier's)."""
    if len(ds) == 0:  # e.g. a client whose images were all missing: it declines, it does not crash
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(torch.zeros(0, 3, size, size), torch.zeros(0, 1, dtype=torch.long), empty, empty,
                     torch.zeros(0, dtype=torch.bool))
    if isinstance(ds.features["image"], Value):  # a manifest's files, at the model's own resolution
        images: torch.Tensor | ImageFiles = ImageFiles(ds["image"], size, tuple(mean), tuple(std))
        cols = ds.select_columns(["label", "group", "toxic"]).with_format("numpy")[:]
    else:  # the bundled digits: their renderer's arrays, in memory
        cols = ds.with_format("numpy")[:]
        pixels = torch.as_tensor(np.asarray(cols["image"]), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        if pixels.shape[-1] != size:
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    tokens = tokenizer(list(ds["caption"]))  # once per dataset: batches index the tokens
    return Batch(
        images=images,
        tokens=tokens,
        labels=torch.as_tensor(np.asarray(cols["label"]), dtype=torch.long),
        groups=torch.as_tensor(np.asarray(cols["group"]), dtype=torch.long),
        toxic=torch.as_tensor(np.asarray(cols["toxic"] if toxic is None else toxic, dtype=bool)),
    )
