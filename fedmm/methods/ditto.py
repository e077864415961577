"""Ditto (Li et al. 2021), the client half: a personal adapter kept on the client, pulled towards the global one.

Each round the client first trains the global adapter as FedAvg's clients do
and replies with it; then it trains its own personal adapter v (its state,
the global adapter at first) for the round's local steps on the loss plus
lambda/2 ||v - w||^2, w the global adapter it received (``ditto-lambda`` in
the train config; strategies/personal.py sends it). v never leaves the
client. Evaluate replies carry ``personal-*``: the same metrics of v on the
client's held-out split, beside the global adapter's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from peft import PeftModel

from .. import lora, protocol
from ..train import proximal_term
from . import ClientMethod, Evaluate, LossTerm

DEFAULT_LAMBDA = 0.1


class DittoClient(ClientMethod):
    name = "ditto"
    personal = True

    def begin(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray]) -> None:
        self.lam = protocol.number(self.config, protocol.DITTO_LAMBDA, DEFAULT_LAMBDA)
        if not 0 <= self.lam < 1e6:
            raise ValueError(f"'{protocol.DITTO_LAMBDA}' = {self.lam}: must be in [0, 1e6)")

    def after_reply(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray],
                    train: Callable[[list[LossTerm]], None]) -> None:
        lora.load_global(net, dict(global_arrays))
        anchors = lora.trainable_parameters(net)  # w: the global adapter as received (proximal_term copies it)
        term = proximal_term(anchors, self.lam)
        self._load_personal(net)
        train([term])
        self.store("personal", lora.get_adapter_arrays(net))

    def evaluate(self, net: PeftModel, evaluate: Evaluate) -> dict[str, float]:
        self._load_personal(net)  # a client that has not trained yet: its personal adapter is the global one
        return {protocol.PERSONAL + k: v for k, v in evaluate().items()}

    def _load_personal(self, net: PeftModel) -> None:
        personal = self.load("personal")
        if personal is not None:
            lora.set_adapter_arrays(net, personal)
