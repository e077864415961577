"""FedDyn (Acar et al. 2021) as a third-party fedmm method: a server strategy and its client half, one module.

Client half (``FedDynClient``, entry-point group ``fedmm.client_methods``):
local steps minimise L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta_global||^2,
where g_k is the client's own state (zero at first), updated after training
to g_k - alpha (theta_k - theta_global). Nothing is sent beyond the adapter;
the dynamic term reads no data, so it composes with every DP mode.

Server half (``FedDyn``, entry-point group ``fedmm.strategies``): with m the
connected nodes and P the round's repliers, h <- h - alpha |P|/m
mean_P(theta_k - theta), and theta <- mean_P(theta_k) - h / alpha. The
server sends ``alpha`` in the train config (``feddyn-alpha``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedmm import lora, protocol
from fedmm.methods import ClientMethod, LossTerm, adapter_parameters

ALPHA_KEY = "feddyn-alpha"


class FedDyn(FedAvg):
    """FedDyn: FedAvg with a dynamic regulariser that aligns the clients' optima with the global one (alpha)."""

    def __init__(self, alpha: float = 0.01, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_available_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn=None, evaluate_metrics_aggr_fn=None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_available_nodes=min_available_nodes,
                         weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key,
                         configrecord_key=configrecord_key, train_metrics_aggr_fn=train_metrics_aggr_fn,
                         evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
        if not alpha > 0:
            raise ValueError(f"alpha = {alpha} must be > 0")
        self.alpha = alpha
        self.h: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[ALPHA_KEY] = self.alpha
        self._theta = protocol.to_numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._share = len(messages) / max(1, len(list(grid.get_node_ids())))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return mean, metrics
        plain = protocol.to_numpy(mean)
        for k, theta in self._theta.items():
            if k not in plain:
                continue
            h = self.h.get(k, np.zeros_like(theta)) - self.alpha * self._share * (plain[k] - theta)
            self.h[k] = h
            plain[k] = (plain[k] - h / self.alpha).astype(theta.dtype)
        return protocol.to_record(plain), metrics


class FedDynClient(ClientMethod):
    name = "feddyn"

    def begin(self, net: nn.Module, global_arrays: Mapping[str, np.ndarray]) -> None:
        self.alpha = protocol.number(self.config, ALPHA_KEY, 0.01)
        self.theta = {k: np.asarray(v) for k, v in global_arrays.items()}
        params = adapter_parameters(net)
        self.g = self.load("g") or {k: np.zeros_like(self.theta[k]) for k in params}

    def loss_terms(self, net: nn.Module) -> list[LossTerm]:
        params = adapter_parameters(net)
        pairs = [(p, torch.as_tensor(self.g[k], dtype=p.dtype).to(p.device),
                  torch.as_tensor(self.theta[k], dtype=p.dtype).to(p.device)) for k, p in params.items()]
        alpha = self.alpha

        def dynamic(model: nn.Module, out: object, batch: object) -> torch.Tensor:
            return torch.stack([-(p * g).sum() + 0.5 * alpha * ((p - t) ** 2).sum() for p, g, t in pairs]).sum()

        return [dynamic]

    def reply_arrays(self, net: nn.Module, global_arrays: Mapping[str, np.ndarray],
                     steps_done: int) -> dict[str, np.ndarray]:
        y = lora.get_adapter_arrays(net)
        self.store("g", {k: self.g[k] - self.alpha * (y[k] - self.theta[k]) for k in self.g})
        return {}
