"""Client-level DP on an update: clip to an L2 ball, then add Gaussian noise.

Order matters: clip -> noise -> (later) quantize. Clipping bounds one
client's influence (the sensitivity); noise calibrated to that bound makes
the release private; quantization after the noise is post-processing, so any
codec of ``fedmm.compression`` keeps the guarantee.
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
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    clipped = clip_update(delta, clip_norm)
    return OrderedDict(
        (k, (v + rng.normal(0.0, noise_std, v.shape)).astype(v.dtype, copy=False)) for k, v in clipped.items()
    )
