"""Local heads (FedPer / FedRep style), the client half: the projection heads stay on the client.

The towers' LoRA adapters are federated as FedAvg's; the two projection
heads (image and text embedding projections) are trained by each client
alongside them and never sent: the reply carries the adapter only. A client
keeps its heads in its state (the base model's heads at first). Its
evaluate reply carries the global model's metrics (the base heads, as the
server evaluates it) and ``personal-*``: the same with its own heads.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from .. import protocol
from . import ClientMethod, Evaluate, LossTerm

# the embedding projections of open_clip's towers and of fedmm's package towers (fedmm/towers.py)
HEADS = ("visual.proj", "text_projection", "visual.head.proj.weight", "visual.head.proj.bias", "text.proj.weight",
         "text.proj.bias")
_PEFT_PREFIX = "base_model.model."


def heads_of(net: PeftModel) -> dict[str, nn.Parameter]:
    """The model's projection heads by name (without peft's prefix)."""
    found = {name.removeprefix(_PEFT_PREFIX): p for name, p in net.named_parameters()
             if name.removeprefix(_PEFT_PREFIX) in HEADS}
    if not found:
        raise ValueError(f"local heads: the model has none of the projection heads {HEADS}")
    return found


class LocalHeadsClient(ClientMethod):
    name = "local-heads"
    personal = True
    dp_sgd = ("Opacus computes per-sample gradients for layers, and open_clip's heads are bare projection "
              "matrices; the heads' training would not be clipped")

    def begin(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray]) -> None:
        self.heads = heads_of(net)
        base = getattr(net, "_fedmm_base_heads", None)
        if base is None:  # the base's heads, before any client of this process trained its own
            base = {k: p.detach().cpu().numpy().copy() for k, p in self.heads.items()}
            setattr(net, "_fedmm_base_heads", base)
        self.base = base
        self._set(self.base)  # the global model, as the server has it

    def loss_terms(self, net: PeftModel) -> list[LossTerm]:
        self._set(self.load("heads") or self.base)  # training: this client's own heads, trained with the adapter
        for p in self.heads.values():
            p.requires_grad_(True)
        return []

    def reply_arrays(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray],
                     steps_done: int) -> dict[str, np.ndarray]:
        self.store("heads", {k: p.detach().cpu().numpy().copy() for k, p in self.heads.items()})
        for p in self.heads.values():
            p.requires_grad_(False)
        self._set(self.base)
        return {}

    def evaluate(self, net: PeftModel, evaluate: Evaluate) -> dict[str, float]:
        self._set(self.load("heads") or self.base)
        try:
            return {protocol.PERSONAL + k: v for k, v in evaluate().items()}
        finally:
            self._set(self.base)

    def _set(self, values: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, p in self.heads.items():
                p.copy_(torch.as_tensor(values[k], dtype=p.dtype))
