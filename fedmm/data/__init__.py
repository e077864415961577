"""Datasets (bundled digits, user manifests), partitioning, tensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset, Value, concatenate_datasets

from .images import ImageFiles
from .digits import CLASS_NAMES, DATA_VERSION, ZERO_SHOT_TEMPLATES, load_digits_splits
from .manifest import ManifestError, ManifestReport, load_manifest
from .partition import client_split, partition, site_split, train_sizes

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "Batch",
    "ManifestError",
    "ManifestReport",
    "class_names",
    "group_names",
    "dataset_version",
    "load_splits",
    "client_rows",
    "client_split",
    "public_split",
    "server_split",
    "site_rows",
    "site_split",
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


def _all_rows(path: str, classes: tuple[str, ...], groups: tuple[str, ...]) -> Dataset:
    splits = load_splits(path, classes, groups)
    return concatenate_datasets([splits[name] for name in ("public", "clients", "server")])


def server_split(settings: Settings) -> Dataset:
    """The server's held-out data: every row of 'server-dataset', else the 'server' split of 'dataset'."""
    s = settings
    if s.server_dataset:
        return _all_rows(s.server_dataset, s.class_list, s.group_list)
    return load_splits(s.dataset, s.class_list, s.group_list)["server"]


def public_split(settings: Settings) -> Dataset:
    """The public pairs (base pretraining, public negatives and captions): every row of 'public-dataset', else
    the 'public' split of 'dataset'."""
    s = settings
    if s.public_dataset:
        return _all_rows(s.public_dataset, s.class_list, s.group_list)
    return load_splits(s.dataset, s.class_list, s.group_list)["public"]


def client_rows(settings: Settings) -> Dataset:
    """What simulated clients (and SuperNodes without data of their own) partition: the 'clients' split of
    'dataset'."""
    return load_splits(settings.dataset, settings.class_list, settings.group_list)["clients"]


def site_rows(settings: Settings, manifest: str) -> Dataset:
    """A site's own data: the 'clients' rows (every row without a 'split') of the manifest its node config
    names, its labels and groups looked up in the run's name lists, which a site must have."""
    if not settings.class_list:
        raise ManifestError(
            f"this node's own manifest {manifest} (node config 'dataset'): the run config names no 'classes', so "
            "its labels could mean other classes than the other sites'; the run must set 'classes'")
    return load_splits(manifest, settings.class_list, settings.group_list)["clients"]


def dataset_version(dataset: str) -> str:
    # manifest-v2: images at the model's own resolution (v1 went through a 32 px stage)
    return DATA_VERSION if dataset == "digits" else f"manifest-v2:{dataset}"


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

    def to(self, device: torch.device) -> "Batch":
        """This batch's tensors on ``device`` (a manifest's files stay files: ``subset`` decodes them on the CPU).

        On CUDA the copy is non-blocking from pinned memory, so the next step's batch moves while this one
        computes; on the CPU it is this batch itself.
        """
        if device.type == "cpu" and self.tokens.device.type == "cpu":
            return self
        cuda = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device == device:
                return t
            return (t.pin_memory() if cuda and t.device.type == "cpu" else t).to(device, non_blocking=cuda)

        images = self.images if isinstance(self.images, ImageFiles) else move(self.images)
        return Batch(images, move(self.tokens), move(self.labels), move(self.groups),
                     None if self.toxic is None else move(self.toxic))

    @property
    def files(self) -> bool:
        """Whether the images are still files (decoded as batches draw them)."""
        return isinstance(self.images, ImageFiles)

    def decoded(self) -> "Batch":
        """This batch with its image files decoded once into memory (in-memory images: itself).

        Raises ``UnreadableImage`` naming a file that no longer decodes.
        """
        if not isinstance(self.images, ImageFiles):
            return self
        return Batch(self.images.decode_all(), self.tokens, self.labels, self.groups, self.toxic)

    def window(self, start: int, stop: int) -> "Batch":
        """Examples ``start`` to ``stop`` (views of in-memory tensors; a manifest's files decode here)."""
        toxic = None if self.toxic is None else self.toxic[start:stop]
        return Batch(self.images[start:stop], self.tokens[start:stop], self.labels[start:stop],
                     self.groups[start:stop], toxic)

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
        # channels-last (the arrays' own NHWC order): the CPU convolutions run ~20-30% faster on it than on
        # NCHW, so a manifest's decoded batches are made the same (images.py)
        images = images.contiguous(memory_format=torch.channels_last)
    tokens = tokenizer(list(ds["caption"]))  # once per dataset: batches index the tokens
    return Batch(
        images=images,
        tokens=tokens,
        labels=torch.as_tensor(np.asarray(cols["label"]), dtype=torch.long),
        groups=torch.as_tensor(np.asarray(cols["group"]), dtype=torch.long),
        toxic=torch.as_tensor(np.asarray(cols["toxic"] if toxic is None else toxic, dtype=bool)),
    )
