"""Updates as integers in the ring Z_{2^b}: the two ends of the distributed discrete mechanism. Plain numpy.

A client (``encode_integer``): clip the flat update to L2 norm C -> random
rotation (randomised Hadamard on a public round seed: it spreads the norm
over all coordinates, so a per-coordinate bound of ~C/sqrt(D) holds) ->
scale by gamma and round stochastically to integers (unbiased), drawn again
in the rare case the rounded norm exceeds DDGauss's conditional bound (below)
-> clamp each coordinate to [-L, L] (rarely active; it can only shrink the
norm) -> add its share of Skellam noise -> reduce mod 2^b. The server (``decode_sum``)
lifts the ring sum to signed integers, divides by gamma and rotates back.

Why it holds: for one client's contribution v (zero-out neighbours: the
client takes part either way, with or without its data), ||v||_2 is at most
sqrt(gamma^2 C^2 + D/4 + sqrt(2 ln(1/beta)) (gamma C + sqrt(D)/2)), because
a rounding above it is drawn again (conditional randomized rounding, Kairouz,
Liu & Steinke 2021, Lemma: one draw exceeds it with probability <= beta),
and never more than gamma C + sqrt(D) or sqrt(D) L; these are the sensitivities the Skellam accountant charges
(``fedmm.secagg.accounting``). The sum of the clients' noise shares is
Skellam again, so the ring sum carries the full noise once ``threshold``
honest clients contributed. The ring cannot wrap while |sum| < 2^(b-1):
``IntegerCode.check_ring`` bounds the signal (n L) and the noise (a
Bernstein tail, failure probability ``WRAP_PROBABILITY`` per round) and
refuses a code that could wrap, with the numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

WRAP_PROBABILITY = 1e-9  # a coordinate of the ring sum wraps in a round with at most this probability
ROUNDING_BETA = math.exp(-0.5)  # DDGauss's conditional rounding: one draw is rejected with at most this probability
ROUNDING_DRAWS = 1000  # then the encoding fails (probability <= beta^1000) rather than exceed the bound
CLAMP_PROBABILITY = 1e-3  # a rotated coordinate exceeds the clamp L with at most this probability
RING_BITS = range(8, 33)  # ring widths supported: values travel as uint8/uint16/uint32


def ring_dtype(bits: int) -> type:
    """The narrowest unsigned integer type that holds Z_{2^b}: what a ring element travels as."""
    return np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32


def padded_length(dim: int) -> int:
    """D: the rotation works on the next power of two (the extra coordinates travel too)."""
    return 1 << max(0, (dim - 1).bit_length())


def _hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of a power-of-two-length vector (its own inverse)."""
    n = len(x)
    y = x.astype(np.float64, copy=True)
    h = 1
    while h < n:
        blocks = y.reshape(-1, 2, h)
        y = np.stack((blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]), axis=1).reshape(n)
        h *= 2
    return y / math.sqrt(n)


def _signs(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=length)


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """Randomised Hadamard rotation H diag(s) of ``x`` zero-padded to D; ``seed`` is public (the round's)."""
    padded = np.zeros(padded_length(len(x)))
    padded[: len(x)] = x
    return _hadamard(padded * _signs(seed, len(padded)))


def unrotate(y: np.ndarray, seed: int, dim: int) -> np.ndarray:
    return (_hadamard(y) * _signs(seed, len(y)))[:dim]


def round_stochastic(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each value down or up to an integer with the probabilities that make E[round(x)] = x."""
    low = np.floor(x)
    return (low + (rng.random(x.shape) < (x - low))).astype(np.int64)


def skellam_noise(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam: Poisson(variance/2) - Poisson(variance/2); a sum of these is Skellam again."""
    if variance <= 0:
        return np.zeros(size, dtype=np.int64)
    return rng.poisson(variance / 2, size) - rng.poisson(variance / 2, size)


def bernstein_tail(variance: float, coordinates: int, probability: float) -> float:
    """t such that a centred sum of unit-bounded independent parts with this variance exceeds |t| in any of
    ``coordinates`` coordinates with probability <= ``probability`` (Bernstein: 2 exp(-t^2 / (2(V + t/3))))."""
    if variance <= 0:
        return 0.0
    log_term = math.log(2 * coordinates / probability)
    # the positive root of t^2 = 2 log_term (V + t/3)
    b = 2 * log_term / 3
    return (b + math.sqrt(b * b + 8 * log_term * variance)) / 2


@dataclass(frozen=True)
class IntegerCode:
    """How one round's updates become ring elements; the server announces it, every client uses it."""

    dim: int  # d: values in one update
    clip: float  # C: L2 bound of an update
    scale: float  # gamma: integer units per unit of update
    bits: int  # b: the ring is Z_{2^b}
    bound: int  # L: per-coordinate clamp after rounding
    noise_variance: float  # each client's Skellam share, in integer units (0: no noise)
    seed: int  # the round's public rotation seed
    rotate: bool = True

    @property
    def length(self) -> int:
        """Ring elements one client sends."""
        return padded_length(self.dim) if self.rotate else self.dim

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def dtype(self) -> type:
        return ring_dtype(self.bits)

    def as_dict(self) -> dict[str, float | int | bool]:
        """The code as plain values (the server announces it in the mask request)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IntegerCode:
        """The code announced in ``values``; ValueError when a field is missing, ill-typed or out of range."""
        try:
            code = cls(int(values["dim"]), float(values["clip"]), float(values["scale"]), int(values["bits"]),
                       int(values["bound"]), float(values["noise_variance"]), int(values["seed"]),
                       bool(values["rotate"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"integer code: {type(exc).__name__}: {exc}") from None
        if not (code.dim >= 1 and code.bits in RING_BITS and 0 < code.clip < math.inf and 0 < code.scale < math.inf
                and 1 <= code.bound < code.modulus // 2 and 0 <= code.noise_variance < math.inf):
            raise ValueError(f"integer code out of range: {code}")
        return code

    def rounding_bound(self) -> float:
        """The L2 norm a client's rounded vector may have: DDGauss's conditional-rounding bound, or the plain
        one (every coordinate moved by < 1) where that is smaller."""
        signal, root = self.scale * self.clip, math.sqrt(self.length)
        conditional = math.sqrt(signal**2 + self.length / 4
                                + math.sqrt(2 * math.log(1 / ROUNDING_BETA)) * (signal + root / 2))
        return min(signal + root, conditional)

    def l2_sensitivity(self) -> float:
        """||v||_2 of one client's integer vector (without its noise): the Skellam accountant's Delta_2."""
        return min(self.rounding_bound(), math.sqrt(self.length) * self.bound)

    def l1_sensitivity(self) -> float:
        return min(math.sqrt(self.length) * self.l2_sensitivity(), self.length * self.bound)

    def mean_bound(self, weights: list[float]) -> float:
        """The largest L2 norm the decoded weighted mean of honest contributors can have (except with probability
        WRAP_PROBABILITY): each scales its update, clipped to C, by its weight in (0, 1], so their weighted mean
        is within C; rounding adds < 1 per coordinate per client (at most the conditional-rounding bound in
        all), the summed noise shares at most the ring check's tail per coordinate."""
        root = math.sqrt(self.length)
        signal = sum(min(self.rounding_bound(), w * self.scale * self.clip + root) for w in weights)
        noise = root * bernstein_tail(len(weights) * self.noise_variance, self.length, WRAP_PROBABILITY)
        return (signal + noise) / self.scale / sum(weights)

    def sum_bound(self, clients: int) -> float:
        """|coordinate| of a sum of ``clients`` contributions, except with probability WRAP_PROBABILITY."""
        noise = bernstein_tail(clients * self.noise_variance, self.length, WRAP_PROBABILITY)
        return clients * self.bound + noise

    def check_ring(self, clients: int) -> None:
        """Refuse a code whose sum of ``clients`` contributions could wrap around the ring."""
        if self.bits not in RING_BITS:
            raise ValueError(f"secagg-bits = {self.bits}: the ring width must be in {RING_BITS.start}..{RING_BITS.stop - 1}")
        limit = self.modulus // 2 - 1
        if self.sum_bound(clients) > limit:
            raise ValueError(
                f"the sum of {clients} clients could wrap around Z_2^{self.bits}: signal {clients} x {self.bound} "
                f"+ noise tail {self.sum_bound(clients) - clients * self.bound:.0f} (variance "
                f"{clients * self.noise_variance:.3g}) > {limit}; raise secagg-bits or lower the noise"
            )


def derive_code(dim: int, clip: float, bits: int, clients: int, noise_multiplier: float, threshold: int,
                seed: int, rotate: bool = True) -> IntegerCode:
    """The finest scale gamma whose ring sum of ``clients`` cannot wrap, with noise for ``noise_multiplier``.

    The central noise the sum must carry is (noise_multiplier * Delta_2)^2 in integer units; each client
    adds 1/``threshold`` of it, so any ``threshold`` contributors together carry all of it.
    """
    if clip <= 0 or dim < 1 or clients < 1 or not 1 <= threshold <= clients:
        raise ValueError(f"derive_code: dim {dim}, clip {clip}, clients {clients}, threshold {threshold}")
    length = padded_length(dim) if rotate else dim
    spread = math.sqrt(2 * math.log(2 * length / CLAMP_PROBABILITY) / length) if rotate else 1.0

    def code(scale: float) -> IntegerCode:
        bound = math.ceil(scale * clip * min(1.0, spread)) + 1
        partial = IntegerCode(dim, clip, scale, bits, bound, 0.0, seed, rotate)
        variance = (noise_multiplier * partial.l2_sensitivity()) ** 2 / threshold
        return IntegerCode(dim, clip, scale, bits, bound, variance, seed, rotate)

    def fits(scale: float) -> bool:
        return code(scale).sum_bound(clients) <= (1 << bits) // 2 - 1

    low, high = 0.0, 1.0
    while fits(high):
        low, high = high, high * 2
        if high > 2.0**80:
            break
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    if low == 0.0:
        code(1e-12).check_ring(clients)  # raises with the numbers
    result = code(low)
    result.check_ring(clients)
    return result


def encode_integer(update: np.ndarray, code: IntegerCode, rng: np.random.Generator) -> np.ndarray:
    """One client's flat float update as ring elements (noise share included), dtype ``code.dtype``."""
    if update.shape != (code.dim,):
        raise ValueError(f"encode_integer: update of shape {update.shape}, the code expects ({code.dim},)")
    x = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    if norm > code.clip:
        x = x * (code.clip / norm)
    y = (rotate(x, code.seed) if code.rotate else x) * code.scale
    limit = code.rounding_bound()
    for _ in range(ROUNDING_DRAWS):
        v = np.clip(round_stochastic(y, rng), -code.bound, code.bound)
        if float(np.linalg.norm(v)) <= limit:
            break
    else:
        raise RuntimeError(f"encode_integer: {ROUNDING_DRAWS} roundings all exceeded the norm bound {limit:.1f}")
    v = v + skellam_noise(code.noise_variance, len(v), rng)
    return np.mod(v, code.modulus).astype(code.dtype)


def ring_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    """Sum mod 2^b (uint64 arithmetic wraps mod 2^64, a multiple of 2^b)."""
    total = np.zeros(len(vectors[0]), dtype=np.uint64)
    for v in vectors:
        total += v.astype(np.uint64)
    return total & np.uint64((1 << bits) - 1)


def decode_sum(total: np.ndarray, code: IntegerCode) -> np.ndarray:
    """The float sum of the clients' (clipped) updates from their ring sum."""
    signed = total.astype(np.int64)
    signed = np.where(signed >= code.modulus // 2, signed - code.modulus, signed)
    y = signed.astype(np.float64) / code.scale
    return unrotate(y, code.seed, code.dim) if code.rotate else y
