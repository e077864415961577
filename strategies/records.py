"""Flower ArrayRecord <-> ordered numpy dicts (shared by the server wrapper and client mods)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord


def to_numpy(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
