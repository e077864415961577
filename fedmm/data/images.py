"""A manifest's images, decoded through the model's own preprocessing: all at once where they fit, else per batch.

A manifest names image files; nothing decodes them until a node asks for
them. A node whose images fit its memory budget decodes them once
(``decode_all``: the node-config key ``decoded-images-mib``) and trains on
the tensors, so no step waits for PIL; one whose images do not fit decodes
each batch's files as the batch is drawn, so its memory does not grow with
its number of images. Each file goes through open_clip's evaluation
transform for the model (resize the short side to the model's image size,
centre crop, RGB, normalise), so a 224 px photograph reaches a 96 px model at
96 px, not through a fixed thumbnail stage. The bundled digits keep their own
renderer (fedmm/data/digits.py) and stay in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from PIL import Image

Transform = Callable[[Image.Image], torch.Tensor]


@lru_cache(maxsize=8)
def model_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Transform:
    """open_clip's evaluation preprocessing for a model of this image size and normalisation."""
    import open_clip

    return open_clip.image_transform(size, is_train=False, mean=mean, std=std)


class UnreadableImage(ValueError):
    """An image file named by a manifest could not be decoded when a batch needed it."""


class ImageFiles:
    """Image files as a lazy (N, 3, size, size) tensor: indexing decodes and transforms just those files."""

    def __init__(self, paths: Sequence[str], size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.paths = list(paths)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: str) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                return model_transform(self.size, self.mean, self.std)(im.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise UnreadableImage(f"image {path} could not be decoded: {type(exc).__name__}: {exc}") from exc

    @property
    def decoded_bytes(self) -> int:
        """Bytes the decoded images take in memory (float32)."""
        return len(self.paths) * 3 * self.size * self.size * 4

    def decode_all(self, chunk: int = 64) -> torch.Tensor:
        """Every image, decoded once: (N, 3, size, size), channels-last. Raises ``UnreadableImage`` naming the file."""
        if not self.paths:
            return torch.zeros(0, 3, self.size, self.size)
        out = torch.empty(self.shape).contiguous(memory_format=torch.channels_last)
        for start in range(0, len(self.paths), chunk):
            out[start : start + chunk] = self[start : start + chunk]
        return out

    def __getitem__(self, idx: int | slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
        if isinstance(idx, int):
            return self._decode(self.paths[idx])
        if isinstance(idx, slice):
            chosen = self.paths[idx]
        else:
            rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
            chosen = [self.paths[i] for i in rows]
        if not chosen:
            return torch.zeros(0, 3, self.size, self.size)
        # channels-last, as the bundled digits' tensors are: the CPU convolutions run ~20-30% faster on it
        return torch.stack([self._decode(p) for p in chosen]).contiguous(memory_format=torch.channels_last)
