"""Run-config keys of one concern: codecs of both links (fedmm.compression).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..compression import Codec, make_codec, make_downlink_codec
from .declare import key, parses


@dataclass(frozen=True)
class CompressionSettings:
    """Codecs of both links (fedmm.compression)."""

    codec: str = key("fp32", "uplink codec: top-k sparsification and/or a value stage, e.g. 'q8', 'topk0.1+q4'",
                     parses(make_codec, "[topk<f>+](fp32|fp16|bf16|q8|q4|q2)[-row]"))
    codec_downlink: str = key("fp32", "downlink codec for the global adapter (dense only)",
                              parses(make_downlink_codec, "(fp32|fp16|bf16|q8|q4|q2)[-row]"))
    error_feedback: bool = key(True, "clients carry the compression error into their next update")

    @cached_property
    def uplink_codec(self) -> Codec:
        return make_codec(self.codec)

    @cached_property
    def downlink_codec(self) -> Codec:
        return make_downlink_codec(self.codec_downlink)
