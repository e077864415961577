"""SCAFFOLD (Karimireddy et al. 2020), the client half: control variates on the LoRA adapter.

The global record carries the server's control variate c beside the adapter
x (one array per adapter array, keyed ``<key>@scaffold-c``); the node keeps
its own c_i in its state (zero at first). Local steps follow the corrected
gradient g - c_i + c: the loss gains the term <c - c_i, y>, whose gradient
is exactly the correction and which reads no data (under DP-SGD it is added
after clipping and noise). After K steps of plain SGD at step lr, option II
of the paper: c_i+ = c_i - c + (x - y) / (K lr). The reply carries
c + (c_i+ - c_i) beside y, so the update the codec, the DP wrapper and
secure aggregation see holds both of the paper's deltas, (y - x, c_i+ - c_i):
a second vector of the update's size (the uplink doubles), clipped and
noised with it, summable. The server half is strategies/scaffold.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from .. import lora, protocol
from . import ClientMethod, LossTerm, adapter_parameters, method_arrays


class ScaffoldClient(ClientMethod):
    name = "scaffold"
    array_suffix = protocol.SCAFFOLD_CONTROL
    asynchronous = ("the server's c moves by one synchronous cohort's mean correction; buffered corrections of "
                    "older versions would be applied against a c they were not computed for")
    rank_tiers = ("the control variates have the global adapter's shapes: a tier of another rank or other layers "
                  "would correct components it does not train")
    plain_sgd = True  # option II's (x - y) / (K lr) is the mean gradient only for plain SGD

    def begin(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray]) -> None:
        self.c = method_arrays(global_arrays, self.array_suffix)
        if not self.c:
            raise ValueError(f"SCAFFOLD: the global record carries no control variate ('*{self.array_suffix}')")
        self.c_i = self.load("c") or {k: np.zeros_like(v) for k, v in self.c.items()}
        self.x = {k: np.asarray(global_arrays[k]) for k in self.c}

    def loss_terms(self, net: PeftModel) -> list[LossTerm]:
        params = adapter_parameters(net)
        missing = sorted(set(self.c) - set(params))
        if missing:
            raise ValueError(f"SCAFFOLD: control variates for adapter arrays this model does not train: {missing[:3]}")
        pairs = [(params[k], torch.as_tensor(self.c[k] - self.c_i[k], dtype=params[k].dtype).to(params[k].device))
                 for k in self.c]

        def correction(model: nn.Module, out: object, batch: object) -> torch.Tensor:
            return torch.stack([(p * d).sum() for p, d in pairs]).sum()

        return [correction]

    def reply_arrays(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray],
                     steps_done: int) -> dict[str, np.ndarray]:
        y = lora.get_adapter_arrays(net)
        scale = 1.0 / (max(1, steps_done) * self.lr)
        c_new = {k: self.c_i[k] - self.c[k] + (self.x[k] - y[k]) * scale for k in self.c}
        self.store("c", c_new)
        return {k + self.array_suffix: (self.c[k] + c_new[k] - self.c_i[k]).astype(np.float32) for k in self.c}
