"""Run-config keys of one concern: local training and the client objective (fedmm.train, fedmm.losses).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .declare import (
    key,
    non_negative,
    one_of,
    positive,
)

LOSSES = ("auto", "clip", "unicl", "public-negatives")
LOCAL_OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainingSettings:
    """Local training and the client objective (fedmm.train, fedmm.losses)."""

    local_steps: int = key(12, "optimizer steps per client per round", positive)
    batch_size: int = key(32, "client batch size", positive)
    lr: float = key(3e-3, "client learning rate (the local optimizer's step size on adapter parameters)", positive)
    local_optimizer: str = key(
        "adamw",
        "clients' optimizer: 'adamw', or 'sgd' (plain SGD at lr; what QFedAvg's Lipschitz estimate 1/lr assumes)",
        one_of(*LOCAL_OPTIMIZERS),
    )
    weight_decay: float = key(0.0, "client weight decay (decoupled under adamw, L2 under sgd)", non_negative)
    proximal_mu: float = key(0.0, "FedProx mu: adds mu/2 * ||w - w_global||^2", non_negative)
    loss: str = key(
        "auto",
        "client objective: 'clip' (open_clip ClipLoss, in-batch negatives), 'unicl' (ClipLoss with every "
        "in-batch pair of the same class as a positive; for label-skewed clients), 'public-negatives' (per-sample "
        "InfoNCE against public pairs embedded each step; what DP-SGD needs), 'auto' = public-negatives under "
        "dp-sgd, else clip",
        one_of(*LOSSES),
    )
    public_captions: int = key(
        0,
        "captions of public pairs added, with gradient, to every step of the 'unicl' loss, so a client that "
        "holds one class still contrasts it with the others (0 = in-batch only)",
        non_negative,
    )
