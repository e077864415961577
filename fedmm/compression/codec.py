"""Codecs for adapter updates: spec -> encode/decode with exact byte counts.

A spec is an optional sparsifier then one value stage, joined by '+':
``fp32`` | ``fp16`` | ``bf16`` | ``q8`` | ``q4`` | ``q2`` (``-row`` for per-row
scales), optionally preceded by ``topk<fraction>`` — e.g. ``q4``,
``q8-row``, ``topk0.1+q8``. The payload is a few flat arrays for the whole
update (not per tensor), so per-array overhead stays negligible:

- ``values`` (fp32 / fp16 / bf16-as-uint16) or ``codes`` (bit-packed uint8)
  + ``scales`` (float32, one per tensor or per row);
- with top-k: ``index`` (per-tensor positions, narrowest unsigned type).

Both sides know the layout (ordered names and shapes of the adapter), so it
is not sent; ``decode`` checks every length, dtype and range against it and
raises ``CodecError`` on anything malformed. No pickle anywhere.
"""

from __future__ import annotations

import io
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..protocol import PAYLOAD_CODES, PAYLOAD_INDEX, PAYLOAD_SCALES, PAYLOAD_VALUES

from .quantize import (
    dequantize,
    from_bf16,
    pack_bits,
    packed_length,
    quantize_stochastic,
    to_bf16,
    unpack_bits,
)

Layout = Sequence[tuple[str, tuple[int, ...]]]
_VALUE = re.compile(r"^(fp32|fp16|bf16|q(2|4|8)(-row)?)$")
_TOPK = re.compile(r"^topk(0?\.\d+|1(\.0*)?)$")


class CodecError(ValueError):
    """A payload does not decode: wrong keys, dtypes, lengths or values."""


def layout_of(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(np.asarray(v).shape)) for k, v in arrays.items()]


def index_dtype(size: int) -> np.dtype:
    """Narrowest unsigned type that holds positions 0..size-1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def npy_bytes(key: str, array: np.ndarray) -> int:
    """Bytes Flower counts for one array: its .npy serialization (header + data) plus the key."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return header.tell() + array.nbytes + len(key)


def layout_arrays(layout: Layout) -> dict[str, np.ndarray]:
    """The layout as two arrays (names as UTF-8, shapes as [ndim, dims...]) for a self-describing payload."""
    names = "\n".join(name for name, _ in layout).encode()
    shapes = [x for _, shape in layout for x in (len(shape), *shape)]
    return {"layout-names": np.frombuffer(names, dtype=np.uint8).copy(), "layout-shapes": np.asarray(shapes, np.int64)}


def layout_from_arrays(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    try:
        names = bytes(np.asarray(arrays["layout-names"], dtype=np.uint8)).decode().split("\n")
        flat = [int(x) for x in np.asarray(arrays["layout-shapes"], dtype=np.int64)]
    except (KeyError, UnicodeDecodeError) as exc:
        raise CodecError(f"payload has no valid layout: {exc}") from exc
    layout, at = [], 0
    for name in names:
        if at >= len(flat) or flat[at] < 0 or at + 1 + flat[at] > len(flat):
            raise CodecError("payload layout is truncated")
        shape = tuple(flat[at + 1 : at + 1 + flat[at]])
        if any(d <= 0 for d in shape):
            raise CodecError(f"payload layout: bad shape {shape} for '{name}'")
        layout.append((name, shape))
        at += 1 + flat[at]
    if at != len(flat):
        raise CodecError("payload layout has trailing data")
    return layout


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    return sum(npy_bytes(k, np.asarray(v)) for k, v in payload.items())


@dataclass(frozen=True)
class Codec:
    spec: str
    topk: float | None  # fraction kept, None = dense
    value: str  # fp32 | fp16 | bf16 | q
    bits: int = 32
    per_row: bool = False

    @classmethod
    def parse(cls, spec: str) -> Codec:
        parts = [p.strip() for p in spec.lower().split("+") if p.strip()]
        topk = None
        if parts and _TOPK.match(parts[0]):
            topk = float(parts[0][4:])
            parts = parts[1:]
            if not parts:
                parts = ["fp32"]
        if len(parts) != 1 or not _VALUE.match(parts[0]):
            raise ValueError(
                f"codec '{spec}': expected [topk<fraction>+](fp32|fp16|bf16|q8|q4|q2)[-row], "
                "e.g. 'q4', 'q8-row', 'topk0.1+q8'"
            )
        if topk is not None and not 0.0 < topk <= 1.0:
            raise ValueError(f"codec '{spec}': top-k fraction must be in (0, 1]")
        v = parts[0]
        if v.startswith("q"):
            return cls(spec, topk, "q", int(v[1]), v.endswith("-row"))
        return cls(spec, topk, v, {"fp32": 32, "fp16": 16, "bf16": 16}[v])

    @property
    def lossless(self) -> bool:
        return self.topk is None and self.value == "fp32"

    def kept(self, size: int) -> int:
        return size if self.topk is None else max(1, math.ceil(self.topk * size))

    # -- encode ---------------------------------------------------------------
    def encode(self, update: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        flat, index = [], []
        for name, x in update.items():
            v = np.asarray(x, dtype=np.float32).reshape(-1)
            if self.topk is not None:
                k = self.kept(v.size)
                pos = np.sort(np.argpartition(np.abs(v), v.size - k)[v.size - k :])
                index.append(pos.astype(index_dtype(v.size)))
                v = v[pos]
            flat.append((name, v, np.asarray(x).shape))
        payload: dict[str, np.ndarray] = {}
        if index:
            # Concatenate in the widest index type needed; per-tensor sizes fix the split.
            dt = max((i.dtype for i in index), key=lambda d: d.itemsize)
            payload[PAYLOAD_INDEX] = np.concatenate([i.astype(dt) for i in index])
        values = np.concatenate([v for _, v, _ in flat]) if flat else np.zeros(0, np.float32)
        if self.value == "fp32":
            payload[PAYLOAD_VALUES] = values
        elif self.value == "fp16":
            payload[PAYLOAD_VALUES] = values.astype(np.float16)
        elif self.value == "bf16":
            payload[PAYLOAD_VALUES] = to_bf16(values)
        else:
            codes, scales = [], []
            for _name, v, shape in flat:
                rows_shape = shape if (self.topk is None) else (v.size,)
                c, s = quantize_stochastic(v.reshape(rows_shape), self.bits, rng, self.per_row and self.topk is None)
                codes.append(c)
                scales.append(s)
            payload[PAYLOAD_CODES] = pack_bits(np.concatenate(codes), self.bits)
            payload[PAYLOAD_SCALES] = np.concatenate(scales).astype(np.float32)
        return payload

    # -- decode ---------------------------------------------------------------
    def _rows(self, shape: tuple[int, ...]) -> int:
        return shape[0] if (self.per_row and self.topk is None and len(shape) >= 2) else 1

    def decode(self, payload: Mapping[str, np.ndarray], layout: Layout) -> OrderedDict[str, np.ndarray]:
        expected_keys = {PAYLOAD_INDEX} if self.topk is not None else set()
        expected_keys |= {PAYLOAD_CODES, PAYLOAD_SCALES} if self.value == "q" else {PAYLOAD_VALUES}
        if set(payload) != expected_keys:
            raise CodecError(f"codec {self.spec}: payload keys {sorted(payload)}, expected {sorted(expected_keys)}")
        sizes = [int(np.prod(shape)) for _, shape in layout]
        kept = [self.kept(n) for n in sizes]
        total = sum(kept)
        positions = None
        if self.topk is not None:
            index = np.asarray(payload[PAYLOAD_INDEX])
            want = max((index_dtype(n) for n in sizes), key=lambda d: d.itemsize) if sizes else np.dtype(np.uint8)
            _check(index, want, total, "index", self.spec)
            positions = np.split(index.astype(np.int64), np.cumsum(kept)[:-1])
            for (name, _), pos, n in zip(layout, positions, sizes):
                if len(pos) and (pos.max() >= n or np.any(np.diff(pos) <= 0)):
                    raise CodecError(f"codec {self.spec}: '{name}': indices out of range or not increasing")
        if self.value == "q":
            num_scales = sum(self._rows(shape) for _, shape in layout)
            codes = np.asarray(payload[PAYLOAD_CODES])
            scales = np.asarray(payload[PAYLOAD_SCALES])
            _check(codes, np.dtype(np.uint8), packed_length(total, self.bits), "codes", self.spec)
            _check(scales, np.dtype(np.float32), num_scales, "scales", self.spec)
            if not np.all(np.isfinite(scales)) or np.any(scales < 0):
                raise CodecError(f"codec {self.spec}: scales must be finite and >= 0")
            flat_codes = unpack_bits(codes, self.bits, total)
            if flat_codes.size and flat_codes.max() > 2 * (2 ** (self.bits - 1) - 1):
                raise CodecError(f"codec {self.spec}: code out of range")
        else:
            values = np.asarray(payload[PAYLOAD_VALUES])
            dt = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[self.value]
            _check(values, np.dtype(dt), total, "values", self.spec)
            values = from_bf16(values) if self.value == "bf16" else values.astype(np.float32)
            if not np.all(np.isfinite(values)):
                raise CodecError(f"codec {self.spec}: non-finite values")
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        at_value = at_scale = 0
        for i, ((name, shape), n, k) in enumerate(zip(layout, sizes, kept)):
            if self.value == "q":
                rows = self._rows(shape)
                part_shape = shape if self.topk is None else (k,)
                v = dequantize(flat_codes[at_value : at_value + k], scales[at_scale : at_scale + rows], self.bits, part_shape)
                at_scale += rows
            else:
                v = values[at_value : at_value + k]
            at_value += k
            if positions is not None:
                dense = np.zeros(n, dtype=np.float32)
                dense[positions[i]] = v.reshape(-1)
                v = dense
            out[name] = np.asarray(v, dtype=np.float32).reshape(shape)
        return out


def _check(arr: np.ndarray, dtype: np.dtype, length: int, key: str, spec: str) -> None:
    if arr.dtype != dtype or arr.ndim != 1 or arr.shape[0] != length:
        raise CodecError(
            f"codec {spec}: '{key}' is {arr.dtype}[{arr.shape}], expected {dtype}[{length}]"
        )
