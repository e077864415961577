"""The audit metrics (fedmm/audit.py): a perturbation-sensitive model scores lower robust accuracy than a robust one
on a constructed case, every central evaluation (so every report) carries them, and a window at a time gives what
the whole split does (the clients' own evaluation: tests/test_client_app.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedmm.audit import audit_metrics, perturb
from fedmm.data import Batch

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _images(n: int = 64, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that differ twice: in brightness (0.35 vs 0.65: survives noise and blur) and in the phase of a
    fine checkerboard of amplitude 0.2 (a blur of one pixel erases it)."""
    labels = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((yy + xx) % 2).float() * 2 - 1  # +-1
    pixels = torch.stack([(0.35 + 0.3 * y) + 0.2 * checker * (1 if y else -1) for y in labels.tolist()])
    pixels = pixels[:, None].expand(-1, 3, -1, -1)
    return ((pixels - 0.5) / 0.5).contiguous(), labels


class Reader(nn.Module):
    """A two-class 'model' whose image embedding reads one cue: the brightness, or the checkerboard's phase (with
    a weak contrary pull of the brightness, which the texture outweighs until a blur flattens it)."""

    def __init__(self, cue: str, size: int = 8):
        super().__init__()
        self.cue = cue
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.register_buffer("checker", ((yy + xx) % 2).float() * 2 - 1)
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter: the model has a device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * 0.5 + 0.5
        if self.cue == "brightness":
            score = pixels.mean(dim=(1, 2, 3)) - 0.5
        else:
            score = (pixels.mean(1) * self.checker).mean(dim=(1, 2)) - 0.1 * (pixels.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-score, score], dim=-1)


def _audit(cue: str) -> dict[str, float]:
    images, labels = _images()
    model = Reader(cue)
    data = Batch(images, torch.zeros(len(labels), 4, dtype=torch.long), labels, torch.zeros(len(labels), dtype=torch.long))
    img = F.normalize(model.encode_image(images), dim=-1)
    classes = F.normalize(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), dim=-1)
    return audit_metrics(model, data, classes, img, img, MEAN, STD)


def test_a_perturbation_sensitive_model_scores_lower_robust_accuracy_than_a_robust_one():
    robust, sensitive = _audit("brightness"), _audit("checkerboard")
    # both are perfect on clean images: the cue each reads separates the classes
    images, labels = _images()
    for cue in ("brightness", "checkerboard"):
        assert (Reader(cue).encode_image(images).argmax(-1) == labels).all()
    assert robust["robust-acc-blur"] == 1.0 and robust["consistency-agreement-blur"] == 1.0
    assert sensitive["robust-acc-blur"] < 0.75 < robust["robust-acc-blur"]
    assert sensitive["consistency-agreement-blur"] < robust["consistency-agreement-blur"]
    assert robust["robust-acc-noise"] >= sensitive["robust-acc-noise"] - 0.05  # noise at 0.1 spares both cues
    assert 0.99 < robust["consistency-cosine"] <= 1.0 + 1e-6  # here each image's 'caption' is its own embedding


def test_perturbations_are_fixed_and_stay_in_the_images_range():
    images, _ = _images()
    a = perturb(images, "noise", MEAN, STD, torch.Generator().manual_seed(0))
    b = perturb(images, "noise", MEAN, STD, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6  # [0, 1] pixels, normalised
    blurred = perturb(images, "blur", MEAN, STD, torch.Generator())
    assert blurred.std() < images.std()


def test_every_central_evaluation_carries_the_audit_metrics(base_settings):
    from fedmm.data import server_split
    from server.central import CentralModel

    central = CentralModel.build(base_settings, server_split(base_settings), torch.device("cpu"))
    metrics = central.evaluate(central.initial_arrays())
    for key in ("robust-acc-noise", "robust-acc-blur", "consistency-cosine", "consistency-agreement-noise",
                "consistency-agreement-blur"):
        assert key in metrics
    assert 0 <= metrics["robust-acc-noise"] <= 1 and -1 <= metrics["consistency-cosine"] <= 1
    assert metrics == central.evaluate(central.initial_arrays())  # the same perturbations every time


def test_the_audit_a_window_at_a_time_is_the_audit_of_the_whole_split(monkeypatch):
    """A site's files decode a window at a time; the noise follows one generator, so the metrics do not depend on
    the window."""
    import fedmm.audit
    from fedmm import protocol

    whole = _audit("checkerboard")
    assert set(whole) == set(protocol.AUDIT_SCALARS)
    monkeypatch.setattr(fedmm.audit, "WINDOW", 10)  # 64 images: six full windows and a short one
    assert _audit("checkerboard") == whole
