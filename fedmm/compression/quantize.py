"""Stochastic uniform quantization (QSGD-style) and bit packing. Plain numpy.

``quantize_stochastic`` maps each value to one of 2s+1 levels
{-s..s} * scale/s with s = 2^(bits-1) - 1, rounding up or down at random so
that E[Q(x)] = x (unbiased). The scale is max|x| per tensor or per row; since
max|x| <= ||x||_2 this meets QSGD's bound
E||Q(x) - x||^2 <= min(n/s^2, sqrt(n)/s) ||x||^2 (Alistarh et al. 2017,
Lemma 3.1) and is tighter in practice.
"""

from __future__ import annotations

import numpy as np

BITS = (2, 4, 8)


def levels(bits: int) -> int:
    """s: codes run over -s..s, i.e. 2s+1 = 2^bits - 1 values."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_stochastic(
    x: np.ndarray, bits: int, rng: np.random.Generator, per_row: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Codes in [0, 2s] (uint8, offset by s) and float32 scales (one, or one per row)."""
    s = levels(bits)
    rows = x.reshape(x.shape[0], -1) if (per_row and x.ndim >= 2) else x.reshape(1, -1)
    rows = rows.astype(np.float32, copy=False)
    scale = np.abs(rows).max(axis=1).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    level = np.abs(rows) / safe[:, None] * s  # in [0, s]
    low = np.floor(level)
    up = rng.random(level.shape, dtype=np.float32) < (level - low)
    q = (low + up) * np.sign(rows)
    codes = (q + s).astype(np.uint8).reshape(-1)
    return codes, scale


def dequantize(codes: np.ndarray, scale: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    s = levels(bits)
    rows = (codes.astype(np.float32) - s).reshape(len(scale), -1)
    return (rows * (scale[:, None] / s)).reshape(shape).astype(np.float32)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits -> uint8 array with 8/bits values per byte (little-end first)."""
    if bits == 8:
        return codes.astype(np.uint8, copy=False)
    per = 8 // bits
    padded = np.zeros(-(-len(codes) // per) * per, dtype=np.uint8)
    padded[: len(codes)] = codes
    groups = padded.reshape(-1, per)
    out = np.zeros(len(groups), dtype=np.uint8)
    for i in range(per):
        out |= groups[:, i] << (i * bits)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[:count]
    per = 8 // bits
    mask = (1 << bits) - 1
    out = np.empty((len(packed), per), dtype=np.uint8)
    for i in range(per):
        out[:, i] = (packed >> (i * bits)) & mask
    return out.reshape(-1)[:count]


def packed_length(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)
