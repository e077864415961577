"""Run-config keys of one concern: codecs of both links (fedmm.compression).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compression import make_codec
from .declare import (
    ConfigError,
    key,
    parses,
)


@dataclass(frozen=True)
class CompressionSettings:
    """Codecs of both links (fedmm.compression)."""

    codec: str = key("fp32", "uplink codec: [topk<f>+](fp32|fp16|bf16|q8|q4|q2)[-row]", parses(make_codec))
    codec_downlink: str = key("fp32", "downlink codec for the global adapter (dense only)", parses(make_codec))
    error_feedback: bool = key(True, "clients carry the compression error into their next update")

    def _check_compression(self) -> None:
        if "topk" in self.codec_downlink:
            raise ConfigError(
                "run-config 'codec-downlink': top-k would drop most of the global adapter; "
                "use a dense codec (fp16, bf16, q8, ...)"
            )
