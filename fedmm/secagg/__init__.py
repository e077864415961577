"""Secure aggregation composed with integer encoding and distributed discrete DP. Plain numpy + Flower's crypto.

- ``derive_code`` / ``IntegerCode``: how a round's updates become elements of Z_{2^b} (clip, rotate, scale,
  round stochastically, Skellam noise share), chosen so the ring sum cannot wrap; ``encode_integer`` (client)
  and ``decode_sum`` (server) are its two ends.
- ``SecAggClient`` / ``SecAggServer``: SecAgg+'s four stages for one round, apart from any transport; the
  server ends with the exact ring sum of the contributors' vectors and never sees one of them unmasked.
- ``skellam_epsilon``: the summed Skellam mechanism's epsilon over rounds (Agarwal et al. 2021).
"""

from .accounting import skellam_epsilon, skellam_rdp
from .integer import IntegerCode, decode_sum, derive_code, encode_integer, ring_sum
from .keys import prg_mask
from .masking import SecAggAbort, SecAggClient, SecAggServer

__all__ = [
    "IntegerCode",
    "SecAggAbort",
    "SecAggClient",
    "SecAggServer",
    "decode_sum",
    "derive_code",
    "encode_integer",
    "prg_mask",
    "ring_sum",
    "skellam_epsilon",
    "skellam_rdp",
]
