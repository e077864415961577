"""LoRA factor algebra on plain arrays, for strategies that understand LoRA.

Strategies stay model-agnostic: they see named numpy arrays. A LoRA layer is
recognised by peft's key names: ``<layer>.lora_A.weight`` (r x in, or
r x in x 1 x 1 for a 1x1 convolution) and ``<layer>.lora_B.weight``
(out x r [x 1 x 1]); its update is ``scale * B @ A`` with one scale for every
client (fedmm sets each client's peft alpha so that ``alpha / r`` is the
same whatever its rank), so products of different ranks add up.

Clients of rank r <= R work on the first r rows of A and columns of B and
send them zero-padded to R (``fedmm.lora.fit_rank`` / ``pad_rank``). Key
names: ``fedmm.protocol``, so every
reply has the global shapes and ``B_i @ A_i`` is unchanged by the padding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from fedmm.protocol import A_SUFFIX, B_SUFFIX, DOWNLINK_ONLY, FROZEN_A, FROZEN_B, FROZEN_W  # noqa: F401
from fedmm.protocol import is_downlink_only  # noqa: F401


def lora_layers(keys: Sequence[str]) -> list[str]:
    """Layer prefixes that have both an A and a B factor, in key order."""
    keyset = set(keys)
    return [k[: -len(A_SUFFIX)] for k in keys if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in keyset]


def zero_beyond_rank(arrays: Mapping[str, np.ndarray], rank: int) -> OrderedDict[str, np.ndarray]:
    """``arrays`` with the LoRA components from ``rank`` on set to zero (a padded reply, cleaned)."""
    out = OrderedDict()
    for key, value in arrays.items():
        if key.endswith(A_SUFFIX) and value.shape[0] > rank:
            value = value.copy()
            value[rank:] = 0
        elif key.endswith(B_SUFFIX) and value.shape[1] > rank:
            value = value.copy()
            value[:, rank:] = 0
        out[key] = value
    return out


def as_matrix(factor: np.ndarray) -> np.ndarray:
    """A (r, in[, 1, 1]) or B (out, r[, 1, 1]) as a 2-D matrix."""
    if factor.ndim == 4 and factor.shape[2:] == (1, 1):
        return factor[:, :, 0, 0]
    if factor.ndim != 2:
        raise ValueError(f"a LoRA factor must be 2-D or a 1x1 conv kernel, got shape {factor.shape}")
    return factor


def like(matrix: np.ndarray, template: np.ndarray) -> np.ndarray:
    """``matrix`` reshaped to ``template``'s kind (2-D, or a 1x1 conv kernel)."""
    return matrix[:, :, None, None] if template.ndim == 4 else matrix


def product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """B @ A as an (out, in) matrix, in float64."""
    return as_matrix(b).astype(np.float64) @ as_matrix(a).astype(np.float64)


def stack_factors(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA stacking: B_s = [B_1 ... B_n], A_s = [w_1 A_1; ...; w_n A_n].

    ``B_s @ A_s`` equals ``sum_i w_i B_i @ A_i`` exactly (it is the same sum,
    written as one matrix product of rank sum_i r_i).
    """
    b = np.concatenate([as_matrix(x).astype(np.float64) for x in bs], axis=1)
    a = np.concatenate([w * as_matrix(x).astype(np.float64) for w, x in zip(weights, as_)], axis=0)
    return b, a


def svd_factors(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """B (out, rank), A (rank, in) with B @ A the best rank-``rank`` approximation of ``delta``.

    Eckart-Young: the truncated SVD minimises the Frobenius and spectral error.
    Singular values are split evenly (B = U sqrt(S), A = sqrt(S) V^T) and
    ordered, so the first r rows/columns are themselves the best rank-r
    approximation for every r <= rank: a client of rank r truncates.
    """
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    b = np.zeros((delta.shape[0], rank))
    a = np.zeros((rank, delta.shape[1]))
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    return b, a


def weighted_mean_product(
    replies: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], layer: str
) -> np.ndarray:
    """sum_i w_i B_i A_i / sum_i w_i for one layer, exactly (via stacking)."""
    total = float(sum(weights))
    b, a = stack_factors([r[layer + B_SUFFIX] for r in replies], [r[layer + A_SUFFIX] for r in replies],
                         [w / total for w in weights])
    return b @ a


def sparsity_weights(replies: Sequence[Mapping[str, np.ndarray]], layer: str) -> list[float]:
    """HetLoRA's aggregation weights for one layer: ||B_i A_i||_F normalised to sum 1 (uniform if all are zero)."""
    norms = [float(np.linalg.norm(product(r[layer + B_SUFFIX], r[layer + A_SUFFIX]))) for r in replies]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else [1.0 / len(replies)] * len(replies)


def weighted_mean(replies: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], key: str) -> np.ndarray:
    total = float(sum(weights))
    summed = np.zeros(replies[0][key].shape, dtype=np.float64)
    for w, r in zip(weights, replies):
        summed += w * r[key].astype(np.float64)
    return summed / total


def cast_like(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, np.asarray(v).astype(reference[k].dtype if k in reference else np.float32))
                       for k, v in arrays.items())
