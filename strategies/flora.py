"""FLoRA-style stacking aggregation: exact, with the merge folded into the base.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations" (2024). The round's update is
sum_i w_i B_i A_i, computed by stacking: B_s = [B_1 ... B_n] and
A_s = [w_1 A_1; ...; w_n A_n], whose product is that sum exactly, whatever
the clients' ranks. It is merged into a cumulative frozen update (sent as
stacked factors, or dense once that is smaller), and every client starts the
next round from a fresh adapter of its own rank (the initial A, B = 0).

The price of exactness is the downlink: the frozen update grows by sum_i r_i
ranks per round until it is sent dense (out x in per layer).

Clients: see ``strategies.lora_base``; additionally they add
``scale * frozen_B @ frozen_A`` (or ``scale * frozen_W``) to the base weight of
each layer before training and evaluating (``fedmm.lora.load_global``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies import lora_factors as lf
from strategies.lora_base import LoRAFactorStrategy


class FLoRA(LoRAFactorStrategy):
    """Stacking aggregation: the exact sum of B_i A_i, merged; clients restart from fresh adapters of their rank."""

    def init_state(self) -> None:
        self.initial: OrderedDict[str, np.ndarray] | None = None
        # layer -> cumulative frozen update, as (B, A) factors or a dense matrix
        self.frozen: dict[str, tuple[np.ndarray, np.ndarray] | np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.initial is None:
            self.initial = OrderedDict((k, v) for k, v in self.last_sent.items() if not lf.is_downlink_only(k))
        return messages

    def combine(
        self, arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], ranks: Sequence[int],
        layers: Sequence[str],
    ) -> Mapping[str, np.ndarray]:
        if self.initial is None:
            raise RuntimeError("FLoRA combines before its first configure_train")
        initial, total = self.initial, float(sum(weights))
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for layer in layers:
            a_ref, b_ref = initial[layer + lf.A_SUFFIX], initial[layer + lf.B_SUFFIX]
            b_s, a_s = lf.stack_factors([r[layer + lf.B_SUFFIX] for r in arrays],
                                        [r[layer + lf.A_SUFFIX] for r in arrays], [w / total for w in weights])
            self.frozen[layer] = _merge(self.frozen.get(layer), b_s, a_s)
            out[layer + lf.A_SUFFIX] = a_ref  # a fresh adapter: product zero, the update lives in the merge
            out[layer + lf.B_SUFFIX] = np.zeros_like(b_ref)
        for layer, merged in self.frozen.items():
            if isinstance(merged, tuple):
                b, a = merged
                out[layer + lf.FROZEN_B] = b.astype(np.float32)
                out[layer + lf.FROZEN_A] = a.astype(np.float32)
            else:
                out[layer + lf.FROZEN_W] = merged.astype(np.float32)
        return out


def _merge(old, b: np.ndarray, a: np.ndarray):
    """old + b @ a, kept as stacked factors while that is smaller than dense."""
    if old is None:
        stacked = (b, a)
    elif isinstance(old, tuple):
        stacked = (np.concatenate([old[0], b], axis=1), np.concatenate([old[1], a], axis=0))
    else:
        return old + b @ a
    out_dim, in_dim = stacked[0].shape[0], stacked[1].shape[1]
    if stacked[0].shape[1] * (out_dim + in_dim) >= out_dim * in_dim:
        return stacked[0] @ stacked[1]
    return stacked
