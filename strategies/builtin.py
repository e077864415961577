"""fedmm's built-in strategies: Flower's own Message-API strategies, reused as they are.

Client obligations (honoured by clients/app.py):
- all: reply with the locally trained adapter arrays and ``num-examples``.
- FedProx: add ``proximal-mu``/2 * ||w - w_global||^2 (squared norm, as in the
  FedProx paper) over the adapter tensors to the local loss; the strategy
  sends ``proximal-mu`` in the train config.
- QFedAvg: report ``train_loss``, the loss of the received global adapter on
  the client's training data before local training (F_k(w^t) in q-FFL). The
  server asks for it (``report-train-loss``) when the strategy has a
  ``train_loss_key``. Its ``client_learning_rate`` is fedmm's ``lr`` and it
  takes L = 1/lr, so clients must run plain SGD at that step
  (``local-optimizer = "sgd"``; ``check_local_optimizer`` refuses otherwise).
"""

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)

__all__ = [
    "Bulyan",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "QFedAvg",
]

# Valid ranges of the built-ins' own parameters (Flower does not check them).
# Each entry: parameter -> (check, description of the valid range).
RANGES = {
    "proximal_mu": (lambda v: v >= 0, ">= 0"),
    "beta": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "q": (lambda v: v >= 0, ">= 0"),
    "eta": (lambda v: v > 0, "> 0"),
    "eta_l": (lambda v: v > 0, "> 0"),
    "tau": (lambda v: v > 0, "> 0"),
    "beta_1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta_2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "server_learning_rate": (lambda v: v > 0, "> 0"),
    "server_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "num_malicious_nodes": (lambda v: v >= 0, ">= 0"),
    "num_nodes_to_select": (lambda v: v >= 1, ">= 1"),
    "client_learning_rate": (lambda v: v > 0, "> 0"),
}


def check_population(strategy: object, sampled: int) -> None:
    """Byzantine-robust rules need enough replies per round for their f; fail before round 1."""
    f = getattr(strategy, "num_malicious_nodes", None)
    if f is None:
        return
    need = 4 * f + 3 if isinstance(strategy, Bulyan) else 2 * f + 3
    if sampled < need:
        raise ValueError(
            f"run-config 'strategy-args': {type(strategy).__name__} with num_malicious_nodes={f} needs "
            f">= {need} clients per round, but {sampled} are sampled; lower num_malicious_nodes to "
            f"<= {max(0, (sampled - 3) // (4 if isinstance(strategy, Bulyan) else 2))} or add clients"
        )


def check_local_optimizer(strategy: object, local_optimizer: str) -> None:
    """A strategy that reads ``client_learning_rate`` (QFedAvg: L = 1/lr) treats a client's update as lr times
    its summed gradients, which holds for plain SGD only: with AdamW its step came out ~1% of FedAvg's."""
    if hasattr(strategy, "client_learning_rate") and local_optimizer != "sgd":
        raise ValueError(
            f"run-config 'local-optimizer' = '{local_optimizer}' with strategy '{type(strategy).__name__}': it "
            "estimates the Lipschitz constant as 1/lr, which assumes clients run plain SGD at step lr; set "
            "local-optimizer='sgd' (and an SGD step, e.g. lr=0.1)"
        )
