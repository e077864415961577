"""Run-config keys of one concern: secure aggregation (fedmm.secagg; strategies/secure_aggregation.py).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..secagg.integer import RING_BITS
from .declare import accepts, key, positive

SECAGG_CLIP_NORM = 50.0  # far above the updates of fedmm's jobs: without DP, clipping should not bind


@accepts(f"{RING_BITS.start}..{RING_BITS.stop - 1}")
def _ring_bits(v: Any) -> str | None:
    return None if v in RING_BITS else f"must be in {RING_BITS.start}..{RING_BITS.stop - 1}"


@accepts("0 (a majority of a neighbourhood) or >= 2")
def _threshold(v: Any) -> str | None:
    return None if v == 0 or v >= 2 else "must be 0 (a majority of a neighbourhood) or >= 2"


@accepts("[0, 1)")
def _dropout(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and 0 <= v < 1 else "must be a fraction in [0, 1)"


# Why each dp mode other than none, dp-sgd and distributed cannot run under secure aggregation.
REFUSED_DP = {  # dp modes secure aggregation cannot carry, and why
    "central-server": "the server clips each client's update, which secure aggregation hides from it; "
                      "use dp = 'distributed' (the clients clip and add the noise inside the masked sum)",
    "central-client": "the server would add the noise to a sum it saw without noise; use dp = 'distributed', "
                      "where the clients add it inside the masked sum, so no one sees the noiseless sum",
    "local": "each update already carries noise of norm ~ sigma C sqrt(d), and the ring's clipping to C would "
             "throw away almost all of its signal; local DP protects against the server on its own",
}


@dataclass(frozen=True)
class SecureAggregationSettings:
    """Secure aggregation: SecAgg+ over integer-encoded updates (fedmm.secagg)."""

    secure_aggregation: bool = key(
        False, "the server learns only the sum of the clients' updates (SecAgg+ over Z_2^secagg-bits; each "
               "client clips its update and rounds it to integers); FedAvg-style strategies only")
    secagg_bits: int = key(16, "ring width b of secure aggregation: updates travel as b-bit integers", _ring_bits)
    secagg_clip_norm: float = key(
        SECAGG_CLIP_NORM, "L2 bound each update is clipped to before its integer encoding (a ring needs a bound; "
                          "clients report 'clipped'); under dp = 'distributed' the bound is dp-clip-norm", positive)
    secagg_threshold: int = key(
        0, "secure aggregation's t: shares needed to rebuild a client's secret, and the fewest clients a round "
           "completes with; 0 = a majority of a neighbourhood, the least accepted (below it a server that lies "
           "about dropouts could unmask a client); raise it, e.g. to two thirds, to withstand more clients "
           "colluding with the server", _threshold)
    secagg_dropout: float = key(
        0.1, "the fraction of a round's clients secure aggregation must survive vanishing after they shared keys: "
             "sizes SecAgg+'s neighbourhoods (a round fails with probability <= 2^-20 when clients vanish "
             "independently at this rate) and refuses a threshold that floor(fraction x cohort) gone would leave "
             "unmet; 0 with a threshold of the whole cohort", _dropout)
