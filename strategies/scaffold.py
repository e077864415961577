"""SCAFFOLD (Karimireddy et al. 2020), the server half: FedAvg on the adapter, and the global control variate.

Client obligations (fedmm/methods/scaffold.py, registered under the same
name in ``fedmm.client_methods``): read c from the global record (arrays
``<adapter key>@scaffold-c``), correct each local step by c - c_i, run plain
SGD (``local-optimizer = "sgd"``), and reply with the trained adapter y and,
beside it, c + (c_i+ - c_i).

The global record is the adapter plus c (``with_method_arrays`` adds c = 0
before round 1), so fedmm's chain treats both halves of a reply as one
update: encoded by the codec, clipped and noised together under DP, summed
by secure aggregation. FedAvg's weighted mean of the replies gives the new
adapter (global step 1) and mean_i(c + delta c_i); the control variate then
moves |S|/N of the way, as in the paper: c+ = c + |S|/N * mean_i(delta c_i),
with N the nodes connected when the round was configured. That aggregate is
not FedAvg's own, which Flower's accounted central-DP wrappers (and fedmm's
distributed DP) require beneath them: under central and distributed DP it is
refused (strategies/privacy.py); local DP and DP-SGD compose with it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmm import protocol


class Scaffold(FedAvg):
    """SCAFFOLD: FedAvg with control variates that correct each client's drift (clients run plain SGD)."""

    # its aggregate reads FedAvg's weighted mean and the previous global only, never a reply on its own, so
    # secure aggregation (which hands it the contributors' mean) carries it
    aggregates_weighted_mean = True

    def with_method_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The initial global record: the adapter and a zero control variate beside each of its arrays."""
        plain = protocol.to_numpy(arrays)
        extra = {k + protocol.SCAFFOLD_CONTROL: np.zeros_like(v) for k, v in protocol.trainable(plain).items()
                 if not k.endswith(protocol.SCAFFOLD_CONTROL)}
        return protocol.to_record({**plain, **extra})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._control = {k: v for k, v in protocol.to_numpy(arrays).items() if k.endswith(protocol.SCAFFOLD_CONTROL)}
        if not self._control:
            raise ValueError("SCAFFOLD: the global record carries no control variate (with_method_arrays was not "
                             "applied to the initial arrays)")
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._share = len(messages) / max(1, len(list(grid.get_node_ids())))  # |S| / N
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        plain = protocol.to_numpy(arrays)
        for k, c in self._control.items():  # mean(c + delta c_i) -> c + |S|/N mean(delta c_i)
            plain[k] = (c + self._share * (plain[k] - c)).astype(plain[k].dtype)
        return protocol.to_record(plain), metrics
