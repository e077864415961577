"""A contrastive objective whose per-sample loss depends on that sample only.

CLIP's in-batch loss (open_clip's ClipLoss) uses every other pair of the batch
as a negative, so one example's gradient changes when another example is
added or removed. DP-SGD's analysis assumes each example's gradient is a
function of that example alone (it clips and noises per-sample gradients,
then sums); with ClipLoss the epsilon Opacus reports is not a valid bound.

``FixedNegativesLoss`` keeps CLIP's symmetric InfoNCE shape but draws the
negatives from a fixed set of embeddings computed from *public* data with the
model as it was at the start of the round, detached, and held constant for
the whole round. For pair i with image embedding u_i and text embedding v_i:

    loss_i = 1/2 * ( CE([s u_i.v_i, s u_i.T_1 .. s u_i.T_K], 0)
                   + CE([s v_i.u_i, s v_i.I_1 .. s v_i.I_K], 0) )

where T, I are the K fixed text and image negatives and s is the (frozen)
logit scale. loss_i reads only (image_i, text_i) and data-independent
constants, so per-sample gradients do not interact: removing example j leaves
every other example's gradient unchanged (tests/test_privacy.py checks this
for every trainable tensor). The negatives depend on the global model, which
is itself the output of earlier DP releases and of other clients' data, never
on this client's private examples of this round: adaptive composition covers
it. BatchNorm would couple samples too; fedmm's towers freeze it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch


@dataclass(frozen=True)
class Negatives:
    """Fixed, detached, L2-normalised negative embeddings."""

    images: torch.Tensor  # (K, D)
    texts: torch.Tensor  # (K, D)


@torch.no_grad()
def fixed_negatives(model: nn.Module, public: Batch, count: int, seed: int = 0, chunk: int = 128) -> Negatives:
    """Embed ``count`` public pairs (a seeded draw) with the model as it is now."""
    if len(public) == 0:
        raise ValueError("fixed negatives need a public split; the dataset has no public rows")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(public), generator=gen)[: min(count, len(public))]
    chosen = public.subset(idx)
    was_training = model.training
    model.eval()
    imgs, txts = [], []
    for i in range(0, len(chosen), chunk):
        out = model(chosen.images[i : i + chunk], chosen.tokens[i : i + chunk])
        imgs.append(out["image_features"])
        txts.append(out["text_features"])
    model.train(was_training)
    return Negatives(F.normalize(torch.cat(imgs), dim=-1), F.normalize(torch.cat(txts), dim=-1))


class FixedNegativesLoss(nn.Module):
    """Symmetric InfoNCE against fixed negatives; a per-sample loss.

    ``reduction`` is "mean" or "none" (a vector of per-sample losses), as
    Opacus's ghost clipping expects of a criterion.
    """

    def __init__(self, negatives: Negatives, reduction: str = "mean") -> None:
        super().__init__()
        self.negatives = negatives
        self.reduction = reduction

    def forward(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        u = F.normalize(out["image_features"], dim=-1)
        v = F.normalize(out["text_features"], dim=-1)
        # the scale is a constant here: a trainable scale would be a shared, unclipped parameter
        scale = out["logit_scale"].detach()
        positive = (u * v).sum(-1, keepdim=True)
        image_logits = scale * torch.cat([positive, u @ self.negatives.texts.T], dim=1)
        text_logits = scale * torch.cat([positive, v @ self.negatives.images.T], dim=1)
        target = torch.zeros(u.shape[0], dtype=torch.long, device=u.device)
        per_sample = 0.5 * (
            F.cross_entropy(image_logits, target, reduction="none")
            + F.cross_entropy(text_logits, target, reduction="none")
        )
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()
