"""HetLoRA: zero-padding with sparsity-weighted aggregation, for clients of different LoRA ranks.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models" (EMNLP 2024). Clients of rank r_i hold the first r_i rank
components of the global adapter (truncation). The server zero-pads their
factors to the global rank; the zeros count, so a component only high-rank
clients train is shrunk by the clients that lack it. Each layer's A and B are
then the weighted sums of the padded factors with the paper's
sparsity-weighted aggregation: client i's weight is ||B_i A_i||_F over the
sum of them, so clients whose adapter moved further count more, and a
low-rank client's near-empty module does not drag the aggregate to zero. (The
paper's optional rank self-pruning, a client-side regulariser, is not done.)

Without the sparsity weights this is plain FedAvg of the padded factors: the
benchmarks' ``naive`` row.

Clients: see ``strategies.lora_base`` (adapter zero-padded to the global
rank, ``num-examples``, ``lora-rank``); they truncate the received adapter to
their rank. Arrays that are not LoRA factors are ``num-examples``-weighted
means, as in FedAvg.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from strategies import lora_factors as lf
from strategies.lora_base import LoRAFactorStrategy


class HetLoRA(LoRAFactorStrategy):
    """Zero-padded factors, each layer's summed with weights ||B_i A_i||_F (sparsity-weighted aggregation)."""

    def combine(
        self, arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], ranks: Sequence[int],
        layers: Sequence[str],
    ) -> Mapping[str, np.ndarray]:
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for layer in layers:
            layer_weights = lf.sparsity_weights(arrays, layer)
            for suffix in (lf.A_SUFFIX, lf.B_SUFFIX):
                out[layer + suffix] = lf.weighted_mean(arrays, layer_weights, layer + suffix)
        return out
