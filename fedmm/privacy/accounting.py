"""Epsilon of repeated Gaussian releases (RDP, Opacus's analysis).

Client-level releases here are not subsampled: fedmm claims no amplification
from the server's client sampling (Flower samples a fixed-size set, not a
Poisson draw), so each release is a full Gaussian mechanism (q = 1).
"""

from __future__ import annotations

from .dp_sgd import sample_epsilon


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian mechanisms of this noise multiplier (sensitivity 1)."""
    if releases <= 0:
        return 0.0
    return sample_epsilon([(noise_multiplier, 1.0, releases)], delta)

