"""Audit metrics: robustness to image perturbations and cross-modal consistency, on a held-out split.

The survey's auditing pipelines measure what accuracy alone hides: how a
model's zero-shot accuracy holds up when its images are perturbed (its
Figure 3 plots robust accuracy under Gaussian noise), and how consistent
its two modalities are. At fixed severities, so that runs, rounds and
experiments compare:

- ``robust-acc-noise``: zero-shot accuracy with Gaussian noise of standard
  deviation ``NOISE_STD`` added to every pixel (on the [0, 1] scale, before
  the model's normalisation), clipped to the valid range;
- ``robust-acc-blur``: zero-shot accuracy after a Gaussian blur of
  ``BLUR_SIGMA`` pixels;
- ``consistency-cosine``: the mean cosine similarity between an image's
  embedding and its own caption's;
- ``consistency-agreement-noise`` / ``-blur``: the share of images whose
  zero-shot prediction is the same with and without the perturbation.

The noise is drawn from a generator seeded with ``SEED``: every evaluation
perturbs the same images the same way, so a change between rounds is the
model's, and a run's report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from . import protocol
from .data import Batch
from .device import model_device
from .lora import clip_of

NOISE_STD = 0.1
BLUR_SIGMA = 1.0
SEED = 0
PERTURBATIONS = protocol.AUDIT_PERTURBATIONS
WINDOW = 256  # images perturbed and embedded at once


def perturb(images: torch.Tensor, kind: str, mean: Sequence[float], std: Sequence[float],
            generator: torch.Generator) -> torch.Tensor:
    """Normalised images, perturbed at the fixed severity of ``kind`` in pixel space, normalised again."""
    # on the images' device (a client's held-out split lives on its accelerator); the noise is drawn on the CPU
    # generator and moved, so every device perturbs the same images the same way
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    pixels = images.float() * s + m
    if kind == "noise":
        pixels = pixels + NOISE_STD * torch.randn(pixels.shape, generator=generator).to(images.device)
    elif kind == "blur":
        radius = max(1, int(3 * BLUR_SIGMA + 0.5))
        pixels = gaussian_blur(pixels, kernel_size=[2 * radius + 1] * 2, sigma=[BLUR_SIGMA] * 2)
    else:
        raise ValueError(f"unknown perturbation {kind!r}; known: {PERTURBATIONS}")
    return ((pixels.clamp(0.0, 1.0) - m) / s).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def image_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised image embeddings (on the CPU); the model runs on its own device."""
    base, device = clip_of(model), model_device(model)
    out = [F.normalize(base.encode_image(images[i : i + batch_size].to(device)), dim=-1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def audit_metrics(model: nn.Module, data: Batch, class_emb: torch.Tensor, img: torch.Tensor, txt: torch.Tensor,
                  mean: Sequence[float], std: Sequence[float]) -> dict[str, float]:
    """The audit metrics of ``model`` on ``data``, given its clean normalised image and caption features."""
    if len(data) == 0:
        return {}
    classes = class_emb.cpu()
    clean = (img @ classes.t()).argmax(-1)
    labelled = data.labels >= 0
    out = {protocol.CONSISTENCY_COSINE: float((img * txt).sum(-1).mean())}
    generator = torch.Generator().manual_seed(SEED)
    # a window at a time, so a site whose files decode per batch never holds its whole split decoded; the noise
    # is drawn from one generator in the same order as for the whole split at once, so the result is the same
    preds: dict[str, list[torch.Tensor]] = {kind: [] for kind in PERTURBATIONS}
    for start in range(0, len(data), WINDOW):
        images = data.window(start, start + WINDOW).images  # a manifest's files decode here
        assert isinstance(images, torch.Tensor)
        for kind in PERTURBATIONS:
            perturbed = image_features(model, perturb(images, kind, mean, std, generator), batch_size=WINDOW)
            preds[kind].append((perturbed @ classes.t()).argmax(-1))
    for kind in PERTURBATIONS:
        predicted = torch.cat(preds[kind])
        if labelled.any():
            out[protocol.ROBUST_ACC + kind] = float(((predicted == data.labels) & labelled).sum() / labelled.sum())
        out[protocol.CONSISTENCY_AGREEMENT + kind] = float((predicted == clean).float().mean())
    return out
