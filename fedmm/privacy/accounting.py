"""Epsilon of repeated Gaussian releases (RDP, Opacus's analysis).

Client-level releases here are not subsampled: fedmm claims no amplification
from the server's client sampling (Flower samples a fixed-size set, not a
Poisson draw), so each release is a full Gaussian mechanism (q = 1).
Central and distributed releases are accounted with Flower's RDP accountant
(``client_level_accountant``); ``rounds_allowed`` plans with the same one, so
the plan and the enforcement cannot disagree at the boundary.
"""

from __future__ import annotations

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from .dp_sgd import sample_epsilon


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian mechanisms of this noise multiplier (sensitivity 1)."""
    if releases <= 0:
        return 0.0
    return sample_epsilon([(noise_multiplier, 1.0, releases)], delta)



def client_level_accountant(delta: float, population: int, max_epsilon: float | None) -> RdpAccountant:
    """Flower's RDP accountant for client-level releases: add/remove one client, no amplification."""
    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=max_epsilon,
        )
    )


def rounds_allowed(noise_multiplier: float, delta: float, population: int, max_epsilon: float, num_rounds: int) -> int:
    """Rounds (at most ``num_rounds``) that the ledger enforcing ``max_epsilon`` will release."""
    accountant = client_level_accountant(delta, population, max_epsilon)
    event = GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=population, population_size=population)
    allowed = 0
    while allowed < num_rounds and not accountant.would_exceed(event):
        accountant.compose(event)
        allowed += 1
    return allowed
