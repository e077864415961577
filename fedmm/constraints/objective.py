"""The constrained client objective and the server's dual ascent.

Federated alignment: min_theta sum_j L_j(theta) + lambda * Gap(theta) + mu * Tox(theta),
with the multipliers lambda, mu >= 0 set by the server. Clients cannot
differentiate the constraints as measured (argmax accuracy, top-1
retrieval), so they descend on smooth surrogates computed on each batch:

- ``group-gap``: largest minus smallest per-group mean *soft* accuracy, the
  zero-shot softmax probability of the true class (class prompts embedded
  by the current adapter), with the leading group as a fixed reference so
  the term lifts the trailing group instead of lowering the leading one;
- ``toxicity``: mean in-batch softmax mass of each image on the captions
  flagged toxic on-device.

The server updates the multipliers from the constraints as measured (hard
accuracy gap, toxic top-1 rate, summed over the clients' batches): the
proxy-Lagrangian scheme of Cotter et al. (2019), where the model player uses
surrogates and the multiplier player the true constraint values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..data import Batch
from ..protocol import CONSTRAINTS  # the wire defines the names (a multiplier per constraint)

_STAT = re.compile(r"^cstat-(correct|count)-g(\d+)$")


def soft_group_gap(soft_accuracy: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Largest minus smallest per-group mean of ``soft_accuracy`` (0 with fewer than two groups).

    The leading group's mean is a constant (detached): the gradient lifts the
    trailing group and never pushes the leading one down. A plain max - min
    penalty closes the gap from both sides, "levelling down" accuracy.
    """
    means = [soft_accuracy[groups == g].mean() for g in torch.unique(groups)]
    if len(means) < 2:
        return soft_accuracy.sum() * 0.0  # keeps the graph: a zero with a gradient
    stacked = torch.stack(means)
    return stacked.max().detach() - stacked.min()


def toxic_mass(logits: torch.Tensor, toxic: torch.Tensor) -> torch.Tensor:
    """Mean over rows (images) of the softmax mass on the toxic columns (captions)."""
    return (torch.softmax(logits, dim=1) * toxic.to(logits.dtype)[None, :]).sum(dim=1).mean()


def dual_ascent(multiplier: float, value: float, threshold: float, step: float) -> float:
    """One projected step: max(0, multiplier + step * (value - threshold))."""
    return max(0.0, multiplier + step * (value - threshold))



def _no_class_embeddings() -> torch.Tensor:
    raise ValueError("the group-gap constraint needs the class embeddings")

class ConstraintTerm:
    """A ``fedmm.train`` loss term: sum of multiplier * surrogate, with the measured statistics.

    ``multipliers``: constraint name -> current multiplier (a constraint absent
    here is off). ``class_embeddings``: returns the normalised class-prompt
    embeddings under the current adapter (needed by ``group-gap``).
    ``statistics()``: counts over every batch seen, summed by the server; the
    same keys from every client (``num_groups`` groups), as Flower's metric
    aggregation requires.
    """

    def __init__(self, multipliers: Mapping[str, float],
                 class_embeddings: Callable[[], torch.Tensor] | None = None, num_groups: int = 1) -> None:
        unknown = set(multipliers) - set(CONSTRAINTS)
        if unknown:
            raise ValueError(f"unknown constraint(s) {sorted(unknown)}; known: {', '.join(CONSTRAINTS)}")
        if "group-gap" in multipliers and class_embeddings is None:
            raise ValueError("the group-gap constraint needs the class embeddings")
        self.multipliers = dict(multipliers)
        self.class_embeddings: Callable[[], torch.Tensor] = class_embeddings or _no_class_embeddings
        self.stats: dict[str, float] = {}
        if "group-gap" in multipliers:
            self.stats.update({f"cstat-{kind}-g{g}": 0.0 for g in range(num_groups) for kind in ("correct", "count")})
        if "toxicity" in multipliers:
            self.stats.update({"cstat-toxic-top1": 0.0, "cstat-toxic-mass": 0.0, "cstat-images": 0.0})

    def _add(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + value

    def __call__(self, model: nn.Module, out: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        img, scale = out["image_features"], out["logit_scale"]
        total = img.sum() * 0.0
        if "group-gap" in self.multipliers:
            labelled = batch.labels >= 0
            probs = torch.softmax(scale * img[labelled] @ self.class_embeddings().t(), dim=1)
            labels, groups = batch.labels[labelled], batch.groups[labelled]
            soft = probs.gather(1, labels[:, None]).squeeze(1)
            correct = probs.argmax(1) == labels
            for g in torch.unique(groups).tolist():
                self._add(f"cstat-correct-g{g}", float(correct[groups == g].sum()))
                self._add(f"cstat-count-g{g}", float((groups == g).sum()))
            total = total + self.multipliers["group-gap"] * soft_group_gap(soft, groups)
        if "toxicity" in self.multipliers:
            if batch.toxic is None:
                raise ValueError("the toxicity constraint needs the batch's toxic flags")
            logits = scale * img @ out["text_features"].t()
            mass = toxic_mass(logits, batch.toxic)
            self._add("cstat-toxic-top1", float(batch.toxic[logits.argmax(1)].sum()))
            self._add("cstat-toxic-mass", float(mass.detach()) * len(batch))
            self._add("cstat-images", float(len(batch)))
            total = total + self.multipliers["toxicity"] * mass
        return total

    def statistics(self) -> dict[str, float]:
        return dict(self.stats)


def constraint_values(summed: Mapping[str, float]) -> dict[str, float]:
    """The constraints as measured, from statistics summed over clients (absent when unmeasured)."""
    out = {}
    groups: dict[int, list[float]] = {}
    for key, value in summed.items():
        if m := _STAT.match(key):
            groups.setdefault(int(m.group(2)), [0.0, 0.0])[m.group(1) == "count"] += float(value)
    accs = [correct / count for correct, count in groups.values() if count > 0]
    if len(accs) >= 2:
        out["group-gap"] = max(accs) - min(accs)
    if summed.get("cstat-images", 0) > 0:
        out["toxicity"] = float(summed["cstat-toxic-top1"]) / float(summed["cstat-images"])
    return out
