"""Run-config keys of one concern: differential privacy (fedmm.privacy). The pairings with other groups' keys
whose guarantee would not hold are refused in ``settings.py``.
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .declare import (
    ConfigError,
    key,
    non_negative,
    one_of,
    open_fraction,
    positive,
)

DP_MODES = ("none", "dp-sgd", "central-server", "central-client", "local", "distributed")


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy (fedmm.privacy)."""

    dp: str = key(
        "none",
        "differential privacy: none | dp-sgd (sample level, Opacus) | central-server | central-client | "
        "local | distributed (client level)",
        one_of(*DP_MODES),
    )
    dp_noise_multiplier: float = key(
        1.0, "Gaussian noise std / clipping norm (per step for dp-sgd, per round for client level)", non_negative)
    dp_clip_norm: float = key(
        1.0, "L2 clipping norm: of each per-sample gradient (dp-sgd) or of each client's update", positive)
    dp_delta: float = key(1e-5, "target delta of the (epsilon, delta) guarantee", open_fraction)
    max_epsilon: float = key(
        0.0,
        "privacy budget: a client (dp-sgd, local) stops training, or the run stops (central, distributed), "
        "before epsilon would exceed it; 0 = no budget",
        non_negative,
    )
    dp_negatives: int = key(
        64, "public pairs drawn as negatives at each step of the 'public-negatives' loss", positive)
    dp_grad_sample_mode: str = key(
        "hooks", "Opacus per-sample gradients for dp-sgd: hooks | ghost (ghost clipping)", one_of("hooks", "ghost"))

    def _check_privacy(self) -> None:
        """Rules over this group's keys alone; pairings with other groups' keys: ``settings.py``."""
        if self.dp != "none" and self.dp_noise_multiplier <= 0:
            raise ConfigError(
                f"run-config 'dp-noise-multiplier' = {self.dp_noise_multiplier}: must be > 0 with dp = '{self.dp}' "
                "(without noise there is no guarantee; use dp = 'none')"
            )
        if self.max_epsilon > 0 and self.dp == "none":
            raise ConfigError("run-config 'max-epsilon' is set but 'dp' = 'none': there is no epsilon to budget")
