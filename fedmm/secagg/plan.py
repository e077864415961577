"""A run's secure-aggregation plan, fixed before round 1: who shares with whom, the threshold, the integer code.

The code is derived for the most clients a round can sum (the sampled cohort), so it is the same every round
(only the public rotation seed changes) and a ring sum of any surviving subset cannot wrap. With DP noise
(``dp = distributed``) each client adds a Skellam share of variance mu / t, so any t contributors together
carry the whole mu = (sigma Delta_2)^2 in integer units; the accountant charges exactly that mu, which holds
as long as at least t of a round's contributors are honest (a dishonest one may leave its share out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .accounting import skellam_epsilon
from .integer import IntegerCode, derive_code
from .graph import default_threshold, neighbourhood_size


@dataclass(frozen=True)
class SecAggPlan:
    clients: int  # sampled per round: the most vectors one ring sum holds
    neighbourhood: int  # SecAgg+'s neighbourhood size (itself included)
    threshold: int  # t
    dropout: float  # the fraction of a round's clients the plan survives vanishing after sharing keys
    bits: int  # b
    clip: float  # C: the L2 bound of one (weighted) update
    noise_multiplier: float  # sigma of the summed Skellam noise; 0: none

    @classmethod
    def of(cls, clients: int, bits: int, threshold: int, clip: float, noise_multiplier: float,
           dropout: float = 0.0) -> SecAggPlan:
        """The plan for ``clients`` per round that survives ``dropout`` of them vanishing; ``threshold`` 0 takes
        the default. ValueError names the problem."""
        if clients < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients per round, the run samples {clients}")
        size = neighbourhood_size(clients, dropout, threshold)
        t = threshold or default_threshold(size)
        majority = default_threshold(size)
        if not majority <= t <= size:
            # below a majority, two disjoint groups of one neighbourhood could each rebuild one of a client's two
            # secrets: a server that tells them different stories about who dropped gets both and unmasks that
            # client's update; and a smaller coalition of clients suffices to help it
            raise ValueError(f"'secagg-threshold' = {threshold}: must be in {majority}..{size} (a neighbourhood of "
                             f"{clients} clients per round has {size}; below a majority of it, a server that lies "
                             "about dropouts can rebuild both secrets of a client and unmask its update)")
        if size == clients and clients - math.floor(dropout * clients) < t:
            raise ValueError(
                f"'secagg-threshold' = {t} with 'secagg-dropout' = {dropout:g}: a round where "
                f"{math.floor(dropout * clients)} of its {clients} clients vanish keeps {clients - math.floor(dropout * clients)} "
                f"< t and would release nothing; lower the threshold or the dropout the plan must survive")
        return cls(clients, size, t, dropout, bits, clip, noise_multiplier)

    def code(self, dim: int, seed: int = 0) -> IntegerCode:
        """The round's integer code for ``dim`` values (ValueError with the numbers when the ring could wrap)."""
        return derive_code(dim, self.clip, self.bits, self.clients, self.noise_multiplier, self.threshold, seed)

    def epsilon(self, dim: int, releases: int, delta: float) -> float:
        """Epsilon after ``releases`` rounds: the Skellam mechanism with the noise of t honest contributors."""
        code = self.code(dim)
        return skellam_epsilon(code.l1_sensitivity(), code.l2_sensitivity(), self.threshold * code.noise_variance,
                               releases, delta)
