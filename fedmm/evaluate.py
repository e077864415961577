"""Zero-shot accuracy, retrieval Recall@K / MRR, group fairness, toxic retrieval, grounding.

Retrieval follows open_clip's own ``get_clip_metrics`` (rank of the paired
item under ``logit_scale * img @ txt.T``); a test checks equality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .audit import audit_metrics
from .constraints import fairness_counts, group_fairness, toxic_retrieval, toxic_retrieval_counts
from .data import Batch
from . import protocol
from .device import model_device
from .lora import clip_of

RECALL_AT = (1, 5, 10)


@torch.no_grad()
def encode(model: nn.Module, data: Batch, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Normalised image and text features of a dataset (on the CPU, where the statistics are taken), and the
    logit scale; the model runs on its own device."""
    device = model_device(model)
    imgs, txts, scale = [], [], 1.0
    for i in range(0, len(data), batch_size):
        part = data.window(i, i + batch_size).to(device)
        out = model(part.images, part.tokens)
        imgs.append(out["image_features"])
        txts.append(out["text_features"])
        scale = float(out["logit_scale"])
    return torch.cat(imgs).cpu(), torch.cat(txts).cpu(), scale


@torch.no_grad()
def class_embeddings(model: nn.Module, tokenizer, prompts: list[list[str]]) -> torch.Tensor:
    """One normalised embedding per class: the mean of its prompt embeddings (on the model's device)."""
    base, device = clip_of(model), model_device(model)
    rows = []
    for phrasings in prompts:
        emb = F.normalize(base.encode_text(tokenizer(phrasings).to(device)), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def ranks_of_pairs(logits: torch.Tensor) -> torch.Tensor:
    """0-based rank of the diagonal (paired) item in each row, as open_clip ranks it."""
    ranking = torch.argsort(logits, dim=1, descending=True)
    truth = torch.arange(logits.shape[0]).view(-1, 1)
    return torch.where(ranking == truth)[1]


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, logit_scale: float) -> dict[str, float]:
    logits = logit_scale * img @ txt.t()
    out: dict[str, float] = {}
    for name, lg in (("i2t", logits), ("t2i", logits.t())):
        ranks = ranks_of_pairs(lg).double()
        for k in RECALL_AT:
            out[f"{name}-R@{k}"] = float((ranks < k).double().mean())
        out[f"{name}-mrr"] = float((1.0 / (ranks + 1)).mean())
        out[f"{name}-mean-rank"] = float(ranks.mean() + 1)
    return out


@torch.no_grad()
def grounding(model: nn.Module, data: Batch, img: torch.Tensor, txt: torch.Tensor, logit_scale: float) -> float:
    """How much the model's output depends on the image: D(f(text, img), f(text, blank)).

    f(text, img) is the distribution over the split's captions that the image
    retrieves (softmax of ``logit_scale * img @ txt.T``); the blank image is
    the all-zero normalised image (the data's mean colour). D is the total
    variation distance, averaged over images: 0 = the image is ignored (text
    priors alone), near 1 = the output is grounded in the image.
    """
    first = data.window(0, 1).to(model_device(model))
    image = first.images
    if not isinstance(image, torch.Tensor):  # a window decodes a manifest's files: never left as files
        raise TypeError(f"a window's images are tensors, got {type(image).__name__}")
    blank_feat = model(torch.zeros_like(image), first.tokens)["image_features"].cpu()
    with_image = torch.softmax(logit_scale * img @ txt.t(), dim=1)
    without = torch.softmax(logit_scale * blank_feat @ txt.t(), dim=1)
    return float(0.5 * (with_image - without).abs().sum(dim=1).mean())


def zero_shot_predictions(img: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    return (img @ class_emb.t()).argmax(dim=1)


def evaluate(model: nn.Module, data: Batch, class_emb: torch.Tensor, *, with_counts: bool = False,
             num_groups: int | None = None,
             audit: tuple[Sequence[float], Sequence[float]] | None = None) -> dict[str, float]:
    """Zero-shot accuracy (overall, per group, fairness gaps), retrieval metrics, toxic retrieval, grounding;
    with ``audit`` (the images' normalisation mean and std), the audit metrics of fedmm/audit.py.

    Toxic retrieval uses ``data``'s own captions as the candidate pool and its
    ``toxic`` flags. ``with_counts`` adds the counts a client sends instead of
    predictions (``fairness_counts`` over ``num_groups`` groups, toxic top-1).
    """
    if len(data) == 0:
        return {protocol.NUM_EXAMPLES: 0.0}
    img, txt, scale = encode(model, data)
    preds = zero_shot_predictions(img, class_emb.cpu())
    labelled = data.labels >= 0
    correct = (preds == data.labels) & labelled
    out = {protocol.NUM_EXAMPLES: float(len(data))}
    if labelled.any():
        out["zs-acc"] = float(correct.sum() / labelled.sum())
        y, p, g = (t[labelled].numpy() for t in (data.labels, preds, data.groups))
        out.update(group_fairness(y, p, g, num_classes=class_emb.shape[0]))
        if with_counts:
            out.update(fairness_counts(y, p, g, class_emb.shape[0], num_groups or int(g.max()) + 1))
    for grp in torch.unique(data.groups[labelled]).tolist():
        out[f"num-examples-group-{grp}"] = float(((data.groups == grp) & labelled).sum())
    logits = scale * img @ txt.t()
    if data.toxic is not None:
        out.update(toxic_retrieval(logits, data.toxic))
        if with_counts:
            out.update(toxic_retrieval_counts(logits, data.toxic))
    if len(data) > 1:
        out.update(retrieval_metrics(img, txt, scale))
        target = torch.arange(len(data))
        out["loss"] = float((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2)
        out["grounding"] = grounding(model, data, img, txt, scale)
    if audit is not None:
        out.update(audit_metrics(model, data, class_emb, img, txt, *audit))
    return out
