"""HetLoRA-style zero-padding aggregation for clients of different LoRA ranks.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models" (2024): clients of rank r_i hold the first r_i rank
components of the global adapter (truncation); the server zero-pads their
factors to the global rank and averages. Here component j of A and B is the
``num-examples``-weighted mean over the clients that have it (r_i > j): a
low-rank client's padding is not a vote for zero.

Clients: see ``strategies.lora_base`` (adapter zero-padded to the global
rank, ``num-examples``, ``lora-rank``); they truncate the received adapter to
their rank.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from strategies import lora_factors as lf
from strategies.lora_base import LoRAFactorStrategy


class HetLoRA(LoRAFactorStrategy):
    """Heterogeneous ranks by zero-padding: each rank component averaged over the clients that hold it."""

    def combine(
        self, arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], ranks: Sequence[int],
        layers: Sequence[str],
    ) -> Mapping[str, np.ndarray]:
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for layer in layers:
            b, a = lf.zero_pad_average(arrays, weights, ranks, self.current, layer)
            out[layer + lf.A_SUFFIX], out[layer + lf.B_SUFFIX] = a, b
        return out
