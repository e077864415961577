"""Group fairness and toxic retrieval, measured centrally or from client counts.

Group fairness of zero-shot classification (multi-class) over the data's
protected ``group`` attribute:

- ``acc-gap``: largest minus smallest group accuracy; ``worst-group-acc``.
- ``dp-gap``: demographic parity, one-vs-rest per class (max minus min over
  groups of P(pred = c | group)), averaged over classes.
- ``eo-gap``: equal opportunity, one-vs-rest per class (max minus min over
  groups of P(pred = c | label = c, group)), averaged over the classes every
  group has examples of (a true-positive rate is undefined without positives).

Centrally these are fairlearn's own metrics on the predictions
(``group_fairness``). Federated, clients send counts only, never samples:
``fairness_counts`` -> summed by the server -> ``fairness_from_counts``
gives the same numbers as fairlearn on the pooled predictions (tested).

Toxic retrieval: for each image, is the top-1 caption of a candidate pool
toxic, and how much softmax mass lies on toxic captions.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equal_opportunity_difference,
)
from sklearn.metrics import accuracy_score

FAIRNESS_KEYS = ("acc-gap", "worst-group-acc", "dp-gap", "eo-gap")
TOXICITY_KEYS = ("toxic-top1", "toxic-mass")
_COUNT_KINDS = ("n", "pred", "tp")  # per (group, class): labels, predictions, true positives
COUNT_KEY = re.compile(r"^fair-(n|pred|tp)-g(\d+)-c(\d+)$")
TOXIC_COUNT_KEYS = ("tox-top1", "tox-mass", "tox-images")


def group_fairness(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray, num_classes: int) -> dict[str, float]:
    """Per-group accuracy and the gaps, computed by fairlearn on the predictions."""
    labels, preds, groups = (np.asarray(a) for a in (labels, preds, groups))
    frame = MetricFrame(metrics=accuracy_score, y_true=labels, y_pred=preds, sensitive_features=groups)
    out = {f"zs-acc-group-{g}": float(v) for g, v in frame.by_group.items()}
    if len(frame.by_group) < 2:
        return out
    out["acc-gap"] = float(frame.difference())
    out["worst-group-acc"] = float(frame.group_min())
    present = np.unique(groups)
    out["dp-gap"] = float(np.mean([
        demographic_parity_difference(labels == c, preds == c, sensitive_features=groups) for c in range(num_classes)
    ]))
    eo = [
        equal_opportunity_difference(labels == c, preds == c, sensitive_features=groups)
        for c in range(num_classes)
        if all(((labels == c) & (groups == g)).any() for g in present)
    ]
    if eo:
        out["eo-gap"] = float(np.mean(eo))
    return out


def fairness_counts(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray,
                    num_classes: int, num_groups: int) -> dict[str, int]:
    """What a client sends instead of its predictions: per (group, class) counts."""
    out = {}
    for g in range(num_groups):
        in_g = groups == g
        for c in range(num_classes):
            out[f"fair-n-g{g}-c{c}"] = int((in_g & (labels == c)).sum())
            out[f"fair-pred-g{g}-c{c}"] = int((in_g & (preds == c)).sum())
            out[f"fair-tp-g{g}-c{c}"] = int((in_g & (labels == c) & (preds == c)).sum())
    return out


def fairness_from_counts(counts: dict[str, float]) -> dict[str, float]:
    """``group_fairness``'s numbers from summed ``fairness_counts``."""
    parsed = [(m.group(1), int(m.group(2)), int(m.group(3)), v) for k, v in counts.items() if (m := COUNT_KEY.match(k))]
    if not parsed:
        return {}
    num_groups = 1 + max(g for _, g, _, _ in parsed)
    num_classes = 1 + max(c for _, _, c, _ in parsed)
    table = {kind: np.zeros((num_groups, num_classes)) for kind in _COUNT_KINDS}
    for kind, g, c, v in parsed:
        table[kind][g, c] += float(v)
    n, pred, tp = table["n"], table["pred"], table["tp"]
    sizes = n.sum(1)
    present = sizes > 0
    out = {f"zs-acc-group-{g}": float(tp[g].sum() / sizes[g]) for g in range(num_groups) if present[g]}
    if present.sum() < 2:
        return out
    acc = tp.sum(1)[present] / sizes[present]
    out["acc-gap"] = float(acc.max() - acc.min())
    out["worst-group-acc"] = float(acc.min())
    selection = pred[present] / sizes[present, None]
    out["dp-gap"] = float((selection.max(0) - selection.min(0)).mean())
    covered = (n[present] > 0).all(0)
    if covered.any():
        tpr = tp[present][:, covered] / n[present][:, covered]
        out["eo-gap"] = float((tpr.max(0) - tpr.min(0)).mean())
    return out


def toxic_retrieval(logits: torch.Tensor, toxic: torch.Tensor) -> dict[str, float]:
    """Rows: images; columns: the candidate captions; ``toxic``: flags of the columns."""
    counts = toxic_retrieval_counts(logits, toxic)
    return toxicity_from_counts(counts)


def toxic_retrieval_counts(logits: torch.Tensor, toxic: torch.Tensor) -> dict[str, float]:
    toxic = toxic.to(torch.bool)
    top1 = toxic[logits.argmax(dim=1)]
    mass = torch.softmax(logits, dim=1)[:, toxic].sum(dim=1)
    return {"tox-top1": float(top1.sum()), "tox-mass": float(mass.sum()), "tox-images": float(logits.shape[0])}


def toxicity_from_counts(counts: dict[str, float]) -> dict[str, float]:
    images = float(counts.get("tox-images", 0.0))
    if images <= 0:
        return {}
    return {"toxic-top1": float(counts["tox-top1"]) / images, "toxic-mass": float(counts["tox-mass"]) / images}
