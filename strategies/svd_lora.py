"""Exact product averaging, re-factorised by SVD to each client's rank.

The aggregate is the ``num-examples``-weighted mean of the clients' updates
B_i A_i (computed exactly, not as mean(B) @ mean(A)), factorised by a
truncated SVD at the global rank with the singular values in order: a client
of rank r takes the first r components, which is the best rank-r
approximation of the aggregate (Eckart-Young). With equal ranks this is the
product-correct alternative to averaging A and B separately.

Clients: see ``strategies.lora_base``; they truncate the received adapter to
their rank.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from strategies import lora_factors as lf
from strategies.lora_base import LoRAFactorStrategy


class SVDLoRA(LoRAFactorStrategy):
    """Mean of the products B_i A_i, factorised by SVD; rank-r clients get its best rank-r approximation."""

    def combine(
        self, arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], ranks: Sequence[int],
        layers: Sequence[str],
    ) -> Mapping[str, np.ndarray]:
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for layer in layers:
            a_ref, b_ref = self.last_sent[layer + lf.A_SUFFIX], self.last_sent[layer + lf.B_SUFFIX]
            b, a = lf.svd_factors(lf.weighted_mean_product(arrays, weights, layer), a_ref.shape[0])
            out[layer + lf.A_SUFFIX], out[layer + lf.B_SUFFIX] = lf.like(a, a_ref), lf.like(b, b_ref)
        return out
