"""Epsilon of the summed Skellam mechanism, per round and composed over rounds.

Agarwal, Kairouz & Liu 2021 ("The Skellam Mechanism for Differentially
Private Federated Learning", Theorem 3.5): adding Skellam noise of variance
mu to a sum whose change under one client has integer L1 and L2 norms at most
Delta_1 and Delta_2 is (alpha, eps(alpha))-RDP for every integer alpha > 1 with

    eps(alpha) <= alpha Delta_2^2 / (2 mu) + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu)).

The first term is the Gaussian mechanism's; the rest is what integers cost.
Rounds compose by adding RDP; Opacus converts RDP to (eps, delta) (Balle et
al. 2020). No amplification by sampling is claimed: the server that picks
the cohort is the party the guarantee is against, so it knows who took part.
"""

from __future__ import annotations

from opacus.accountants.analysis.rdp import get_privacy_spent

ORDERS = tuple(range(2, 257))


def skellam_rdp(alpha: int, l1: float, l2: float, variance: float) -> float:
    """The RDP bound at integer order ``alpha`` of one release (Theorem 3.5 above)."""
    if alpha < 2 or alpha != int(alpha):
        raise ValueError(f"skellam_rdp: alpha must be an integer > 1, got {alpha}")
    if variance <= 0:
        return float("inf")
    extra = min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return alpha * l2**2 / (2 * variance) + extra


def skellam_epsilon(l1: float, l2: float, variance: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` rounds of the same summed Skellam release (integer units throughout)."""
    if releases <= 0:
        return 0.0
    rdp = [releases * skellam_rdp(a, l1, l2, variance) for a in ORDERS]
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)
