"""Injected client faults, for tests and benchmarks: which client misbehaves, and how.

``inject-faults = "crash=0.1,scale=0.2"`` makes a fraction of the clients
misbehave in their training replies. Kinds:

- transient, drawn again every round: ``crash`` (the ClientApp raises),
  ``timeout`` (it answers only after the round's timeout), ``nan`` (its
  update is NaN), ``vanish-share`` / ``vanish-mask`` / ``vanish-unmask`` (it trains,
  then crashes at that stage of secure aggregation);
- Byzantine, the same clients every round: ``signflip`` (sends -update),
  ``scale`` (sends 100 x update), ``noise`` (sends N(0, 1) noise as update).

Clients are picked by partition id from the run seed, so a run is
reproducible and the server side can be checked against the pick. Where a
Byzantine and a transient pick meet, the Byzantine fault wins.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

SECAGG_STAGES = ("share", "mask", "unmask")
TRANSIENT = ("crash", "timeout", "nan") + tuple(f"vanish-{stage}" for stage in SECAGG_STAGES)
BYZANTINE = ("signflip", "scale", "noise")
KINDS = TRANSIENT + BYZANTINE
SCALE = 100.0


def parse_faults(spec: str) -> dict[str, float]:
    """``"crash=0.1,scale=0.2"`` -> {"crash": 0.1, "scale": 0.2}; ValueError names what is wrong."""
    faults: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS or not sep:
            raise ValueError(f"'{part}': expected <kind>=<fraction> with kind one of {', '.join(KINDS)}")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"'{part}': fraction '{value.strip()}' is not a number") from None
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"'{part}': fraction must be in [0, 1]")
        faults[kind] = faults.get(kind, 0.0) + fraction
    for group in (TRANSIENT, BYZANTINE):
        if sum(faults.get(k, 0.0) for k in group) > 1.0 + 1e-9:
            raise ValueError(f"fractions of {'/'.join(group)} add up to more than 1")
    return faults


def _assign(kinds: tuple[str, ...], faults: Mapping[str, float], num: int, rng: np.random.Generator) -> dict[int, str]:
    order = rng.permutation(num)
    picked, at = {}, 0
    for kind in kinds:
        count = math.ceil(faults.get(kind, 0.0) * num - 1e-9)
        for pid in order[at : at + count]:
            picked[int(pid)] = kind
        at += count
    return picked


def fault_of(faults: Mapping[str, float], partition: int, num_partitions: int, seed: int, server_round: int) -> str | None:
    """The fault partition ``partition`` injects in ``server_round``, or None."""
    byzantine = _assign(BYZANTINE, faults, num_partitions, np.random.default_rng([seed, 7_000_001]))
    if partition in byzantine:
        return byzantine[partition]
    transient = _assign(TRANSIENT, faults, num_partitions, np.random.default_rng([seed, 7_000_002, server_round]))
    return transient.get(partition)


def corrupt_update(
    kind: str, local: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], rng: np.random.Generator
) -> OrderedDict[str, np.ndarray]:
    """The arrays a client with fault ``kind`` sends instead of ``local`` (trained from ``reference``)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for k, v in local.items():
        delta = np.asarray(v, np.float32) - reference[k]
        if kind == "nan":
            delta = np.full_like(delta, np.nan)
        elif kind == "signflip":
            delta = -delta
        elif kind == "scale":
            delta = SCALE * delta
        elif kind == "noise":
            delta = rng.standard_normal(delta.shape).astype(np.float32)
        else:
            raise ValueError(f"{kind!r} does not corrupt an update")
        out[k] = (reference[k] + delta).astype(np.float32)
    return out
