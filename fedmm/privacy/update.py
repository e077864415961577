"""Client-level DP on an update: clip to an L2 ball, then add Gaussian noise.

Order matters: clip -> noise -> (later) encode. Clipping bounds one client's
influence (the sensitivity); noise calibrated to that bound makes the
release private. When the noise is added here, by the client (``dp =
local``), anything after it — any codec of ``fedmm.compression``, with or
without error feedback, whose residual is computed from the noised update —
is post-processing of a private release and keeps the guarantee.

That argument needs the noise to be added to each client's own release. It
does not carry over when noise is added later to something the codec
changed: ``dp = central-client`` (the server noises what it decodes, Q(clip
+ residual), whose norm a lossy codec does not keep within C) and ``dp =
distributed`` (each noise share is encoded separately, so the sum is not the
Gaussian mechanism the accountant charges) are refused with a lossy codec
(``fedmm.config``); ``central-server`` clips what it decodes, so it holds
with any codec. tests/test_dp_compositions.py checks every combination.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of an update over all its arrays."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def clip_update(delta: Mapping[str, np.ndarray], clip_norm: float) -> OrderedDict[str, np.ndarray]:
    """Scale the update so that its global L2 norm is at most ``clip_norm``."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    factor = min(1.0, clip_norm / max(update_norm(delta), 1e-12))
    return OrderedDict((k, (v * factor).astype(v.dtype, copy=False)) for k, v in delta.items())


def privatize_update(
    delta: Mapping[str, np.ndarray], clip_norm: float, noise_std: float, rng: np.random.Generator
) -> OrderedDict[str, np.ndarray]:
    """Clip to ``clip_norm``, then add N(0, noise_std^2) to every coordinate."""
    return add_gaussian_noise(clip_update(delta, clip_norm), noise_std, rng)


def add_gaussian_noise(
    clipped: Mapping[str, np.ndarray], noise_std: float, rng: np.random.Generator
) -> OrderedDict[str, np.ndarray]:
    """The noise step: N(0, noise_std^2) added to every coordinate of an already clipped update."""
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    return OrderedDict(
        (k, (v + rng.normal(0.0, noise_std, v.shape)).astype(v.dtype, copy=False)) for k, v in clipped.items()
    )
