"""Update compression: one entry point, ``make_codec(spec)``.

Codecs (``codec.py``): identity fp32, fp16/bf16 casts, stochastic 8/4/2-bit
quantization per tensor or per row, top-k sparsification, and top-k followed
by a value stage. ``encode_with_feedback`` adds error feedback (Karimireddy et
al. 2019): the client keeps e_{t+1} = g_t + e_t - C(g_t + e_t) and adds it to
its next update.

Order with privacy: clip -> noise -> encode. Where the client adds the noise
(``dp = local``; ``dp-sgd``, whose noise is in every step), encoding is
post-processing of the private update and keeps the guarantee; the
error-feedback residual is computed from the privatised update too, so no
un-noised information leaks through it. Where noise is added after encoding
the argument fails, because a lossy codec's output is not bounded by the
clipping norm: ``central-client`` and ``distributed`` are refused with a lossy
codec, and ``central-server`` clips each decoded update again
(``fedmm/privacy/update.py`` has the argument, ``fedmm.config`` the refusal).

On the wire every payload is the codec's few concatenated arrays, fp32
included (``encode_self_describing`` / ``decode_self_describing`` for the
downlink, which carries its own layout): Flower moves each array of a
message as a separate object, so a per-tensor adapter would cost hundreds of
requests per node and round in a deployment.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .codec import Codec, CodecError, Layout, layout_arrays, layout_from_arrays, layout_of, payload_bytes

__all__ = [
    "Codec",
    "CodecError",
    "Layout",
    "decode_self_describing",
    "encode_self_describing",
    "encode_with_feedback",
    "layout_arrays",
    "layout_from_arrays",
    "layout_of",
    "make_codec",
    "make_downlink_codec",
    "payload_bytes",
]


@functools.lru_cache(maxsize=64)
def make_codec(spec: str) -> Codec:
    """Parse a codec spec such as ``fp32``, ``q4``, ``q8-row``, ``topk0.1+q8``: once per spec and process (the
    settings check, the server's wrapper, the client's instruction check and its mod all ask for it)."""
    return Codec.parse(spec)


def make_downlink_codec(spec: str) -> Codec:
    """``make_codec``, for the global adapter: a dense codec only (top-k would drop most of the global)."""
    codec = make_codec(spec)
    if codec.topk is not None:
        raise ValueError(f"downlink codec '{spec}': top-k would drop most of the global adapter; use a dense codec "
                         "(fp32, fp16, bf16, q8, ...)")
    return codec


def encode_with_feedback(
    codec: Codec,
    update: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], OrderedDict[str, np.ndarray]]:
    """Encode ``update + residual``; return the payload and the new residual."""
    corrected = OrderedDict(
        (k, np.asarray(v, np.float32) + (residual[k] if residual is not None and k in residual else 0.0))
        for k, v in update.items()
    )
    payload = codec.encode(corrected, rng)
    sent = codec.decode(payload, layout_of(corrected))
    return payload, OrderedDict((k, corrected[k] - sent[k]) for k in corrected)


def encode_self_describing(
    codec: Codec, arrays: Mapping[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The payload plus its layout, so the receiver needs nothing else to decode it."""
    return {**codec.encode(arrays, rng), **layout_arrays(layout_of(arrays))}


def decode_self_describing(codec: Codec, received: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Inverse of ``encode_self_describing``; ``CodecError`` names what is wrong."""
    payload = {k: v for k, v in received.items() if not k.startswith("layout-")}
    return codec.decode(payload, layout_from_arrays(received))
