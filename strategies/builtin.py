"""fedmm's built-in strategies: Flower's own, reused as they are.

Client obligations (honoured by clients/app.py):
- FedAvg: reply with the locally trained adapter arrays and ``num-examples``.
- FedProx: additionally add ``proximal-mu``/2 * ||w - w_global||^2 (squared
  norm, as in the FedProx paper) over the adapter tensors to the local loss;
  the strategy sends ``proximal-mu`` in the train config.
"""

from flwr.serverapp.strategy import FedAvg, FedProx

__all__ = ["FedAvg", "FedProx"]
