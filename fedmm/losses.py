"""Every client loss, with one factory (``create_loss``), as open_clip's ``loss.py``.

- ``clip``: open_clip's ClipLoss (in-batch negatives);
- ``unicl``: ClipLoss with every same-class pair a positive, plus public captions (``UniCLLoss``);
- ``public-negatives``: per-sample InfoNCE against public pairs (``PublicNegativesLoss``), what DP-SGD
  needs (it is the one whose per-example gradients are independent).

``client_objective`` is the run's choice (``Settings.objective``). Plain torch, no Flower.

On ``public-negatives``:
A contrastive objective whose per-sample loss depends on that sample only.

CLIP's in-batch loss (open_clip's ClipLoss) uses every other pair of the batch
as a negative, so one example's gradient changes when another example is
added or removed. DP-SGD's analysis assumes each example's gradient is a
function of that example alone (it clips and noises per-sample gradients,
then sums); with ClipLoss the epsilon Opacus reports is not a valid bound.

``PublicNegativesLoss`` is CLIP's image-to-text InfoNCE with its negatives
taken from *public* pairs: at every step it embeds the captions of a fresh
draw of K public pairs with the current parameters, without gradient. For
pair i with image embedding u_i and text embedding v_i:

    loss_i = CE([s u_i.v_i, s u_i.T_1 .. s u_i.T_K], 0)

where T are the K public caption embeddings (constants in the backward pass)
and s the logit scale, also a constant. Public captions of the sample's own
class (same label; or the same caption when labels are unknown) are masked
out: they are not negatives. loss_i reads only (image_i, text_i, label_i),
the public data and the current parameters, so per-sample gradients do not
interact: removing example j leaves every other example's gradient unchanged
(tests/test_privacy.py checks this for every trainable tensor). The
parameters are the output of earlier DP steps: adaptive composition covers
their use. BatchNorm would couple samples too; fedmm's towers freeze it. The
text tower still learns: through v_i and through the negatives' positions.

Two variants that looked natural failed on the default model (non-private,
10 rounds, measured):
- negatives embedded once per round and frozen: the loss falls by moving all
  embeddings away from where the negatives were; accuracy fell to chance
  (11.2%, vs 84.8% with ClipLoss);
- the symmetric form, adding text-to-image CE of v_i against public *images*:
  client images differ from public ones (a domain shift, as in real
  federations), so texts learn to match "client-looking" images, not the
  class; accuracy fell to chance again (9.7%).

Known limit (measured, non-private, α=0.1, 30 rounds; docs/benchmarks-log.md,
"the public-negatives client loss"): this loss itself is not stable. One
optimizer trained on it for long (centralized, local-only) collapses; a
federation reached 97.8% by round 17 and then collapsed at round 22 (seed 0),
or never learned (seed 1). The negatives carry no gradient, so nothing keeps
captions of different classes apart. Under DP-SGD the noise dominates first;
the fix to try is gradient through the negatives, which Opacus's per-sample
hooks do not take as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import open_clip
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from .data import Batch
from .device import model_device
from .lora import clip_of

if TYPE_CHECKING:
    from .config import Settings

LossFn = Callable[[dict[str, torch.Tensor], Batch], torch.Tensor]


def clip_objective() -> LossFn:
    """open_clip's ClipLoss (in-batch negatives) as a (model output, batch) -> loss function."""
    clip_loss = open_clip.ClipLoss()

    def loss_fn(out: dict[str, torch.Tensor], _batch: Batch) -> torch.Tensor:
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    return loss_fn


class UniCLLoss(nn.Module):
    """ClipLoss with every same-class pair as a positive (UniCL, Yang et al. 2022), plus public captions.

    CLIP's targets are the diagonal: image i must pick caption i out of the
    batch. When several pairs of a batch show the same class, as in most of a
    label-skewed client's batches, the other captions of that class count as
    negatives although nothing in image i tells them apart from its own. Here
    the target of image i is uniform over the captions of its class
    (``Batch.same_class``: same label, or the same caption when unlabelled),
    and symmetrically for captions. With all classes distinct and no public
    captions it is exactly ClipLoss.

    A client that holds one or two classes still only ever contrasts those:
    nothing in its batches keeps the other classes apart, and its steps undo
    that separation (docs/benchmarks-log.md, "Strategies"). With ``public`` and
    ``count`` > 0, each call also embeds ``count`` captions drawn from the
    public pool, *with* gradient, as extra candidates of the image-to-text
    side: positives when of the image's class, negatives otherwise. Public
    images are not used: they differ from client images (a domain shift), and
    texts would learn to match that instead of the class.

    It couples a batch's examples, so DP-SGD refuses it like ClipLoss.
    """

    def __init__(self, model: nn.Module | None = None, public: Batch | None = None, count: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        if count > 0 and (model is None or public is None or len(public) == 0):
            raise ValueError("UniCLLoss with public captions needs the model and a non-empty public pool")
        self._model = [model]  # a list: not a submodule (its parameters are not this loss's)
        self.public, self.count = public, min(count, len(public)) if public is not None else 0
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        images, texts, scale = out["image_features"], out["text_features"], out["logit_scale"]
        same = batch.same_class(batch)
        image_to_text_pos, candidates = same, texts
        model = self._model[0]
        if self.count and self.public is not None and model is not None:
            idx = torch.randperm(len(self.public), generator=self.generator)[: self.count]
            chosen = self.public.subset(idx)
            public_texts = F.normalize(clip_of(model).encode_text(chosen.tokens), dim=-1).to(texts.dtype)
            candidates = torch.cat([texts, public_texts])
            image_to_text_pos = torch.cat([same, batch.same_class(chosen)], dim=1)
        image_to_text = _soft_cross_entropy(scale * images @ candidates.T, image_to_text_pos)
        text_to_image = _soft_cross_entropy(scale * texts @ images.T, same)  # the mask is symmetric
        return (image_to_text + text_to_image) / 2


def _soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy against the uniform distribution on each row's positives."""
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def create_loss(name: str, model: nn.Module, public: Batch | None = None, draw: int = 0, seed: int = 0) -> LossFn:
    """The loss ``name`` ('clip', 'unicl' or 'public-negatives') for ``model``.

    'unicl' and 'public-negatives' draw ``draw`` pairs per step from ``public`` (the seeded pool of
    ``public_pool``), seeded by ``seed``.
    """
    if draw and public is None:
        raise ValueError(f"loss '{name}' draws public pairs; the dataset has no public rows")
    if public is not None:  # the draws' tokens and labels meet the model's features on its device
        public = public.to(model_device(model))
    if name == "clip":
        return clip_objective()
    if name == "unicl":
        return UniCLLoss(model, public, draw, seed=seed)
    if name == "public-negatives":
        if public is None:
            raise ValueError("loss 'public-negatives' needs public pairs; the dataset has no public rows")
        return PublicNegativesLoss(model, public, draw, seed=seed)
    raise ValueError(f"unknown loss '{name}'; known: clip, unicl, public-negatives")


def client_objective(settings: Settings, model: nn.Module, public: Batch | None = None, seed: int = 0) -> LossFn:
    """The run's client loss (``settings.objective``), drawing ``settings.public_draw`` public pairs per step."""
    return create_loss(settings.objective, model, public, settings.public_draw, seed)


def public_pool(public: Dataset, count: int, seed: int) -> Dataset:
    """The seeded public pairs negatives are drawn from: 16x the ``count`` drawn per step keeps memory bounded."""
    return public.shuffle(seed=seed).select(range(min(len(public), 16 * count)))


class PublicNegativesLoss(nn.Module):
    """Image-to-text InfoNCE against K public captions embedded afresh each call; a per-sample loss.

    ``reduction`` is "mean", "sum" or "none" (a vector of per-sample losses,
    as Opacus's ghost clipping expects of a criterion). Draws are seeded
    (public data: nothing to hide), one fresh draw per call.
    """

    def __init__(self, model: nn.Module, public: Batch, count: int, seed: int = 0, reduction: str = "mean") -> None:
        super().__init__()
        if len(public) == 0:
            raise ValueError("public negatives need a public split; the dataset has no public rows")
        self._model = [model]  # a list: not a submodule (its parameters are not this loss's)
        self.public, self.count, self.reduction = public, min(count, len(public)), reduction
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def negatives(self) -> tuple[torch.Tensor, Batch]:
        """A fresh draw of public captions, embedded with the current parameters (normalised, detached)."""
        idx = torch.randperm(len(self.public), generator=self.generator)[: self.count]
        chosen = self.public.subset(idx)
        return F.normalize(clip_of(self._model[0]).encode_text(chosen.tokens), dim=-1), chosen

    def forward(self, out: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        neg_texts, chosen = self.negatives()
        u = F.normalize(out["image_features"], dim=-1)
        v = F.normalize(out["text_features"], dim=-1)
        # a shared trainable scale would be an unclipped, data-dependent parameter: constant here
        scale = out["logit_scale"].detach()
        same = batch.same_class(chosen)  # (B, K): public pairs that are not negatives for this sample
        positive = scale * (u * v).sum(-1, keepdim=True)
        logits = torch.cat([positive, (scale * (u @ neg_texts.T)).masked_fill(same, float("-inf"))], dim=1)
        target = torch.zeros(u.shape[0], dtype=torch.long, device=u.device)
        per_sample = F.cross_entropy(logits, target, reduction="none")
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()

