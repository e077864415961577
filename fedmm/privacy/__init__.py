"""Differential privacy: sample level (DP-SGD) and client level (update clipping + noise).

- ``PublicNegativesLoss``: the per-sample contrastive objective DP-SGD needs
  (objective.py explains why ClipLoss is refused).
- ``train_dp_sgd``: Opacus DP-SGD on the trainable (LoRA) parameters, with the
  client's accountant ledger carried in and out; ``sample_epsilon``.
- ``privatize_update``: clip -> Gaussian noise of a client's update (local
  and distributed DP; before any quantization).
- ``gaussian_epsilon``: epsilon of repeated client-level Gaussian releases
  (the server's own ledger uses Flower's RDP accountant; tests check the two
  agree).
"""

from .accounting import gaussian_epsilon
from .dp_sgd import GRAD_SAMPLE_MODES, sample_epsilon, sample_rate, train_dp_sgd
from ..losses import PublicNegativesLoss, public_pool  # the losses live in one module; DP-SGD needs this one
from .update import clip_update, privatize_update, update_norm

__all__ = [
    "GRAD_SAMPLE_MODES",
    "PublicNegativesLoss",
    "clip_update",
    "gaussian_epsilon",
    "privatize_update",
    "public_pool",
    "sample_epsilon",
    "sample_rate",
    "train_dp_sgd",
    "update_norm",
]
