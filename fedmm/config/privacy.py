"""Run-config keys of one concern: differential privacy (fedmm.privacy); its rules refuse every pairing whose guarantee would not hold.
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..compression import make_codec
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
    """Differential privacy (fedmm.privacy); its rules refuse every pairing whose guarantee would not hold."""

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
        s: Any = self  # the joined Settings: this group's rules read the keys of the others
        if self.dp == "dp-sgd" and s.loss in ("clip", "unicl"):
            raise ConfigError(
                f"run-config 'loss' = '{s.loss}' with 'dp' = 'dp-sgd': this loss uses the other pairs of a batch "
                "as negatives, so one example's gradient depends on the others and DP-SGD's per-sample guarantee "
                "does not hold; use loss = 'public-negatives' (or 'auto')"
            )
        if self.dp != "none" and self.dp_noise_multiplier <= 0:
            raise ConfigError(
                f"run-config 'dp-noise-multiplier' = {self.dp_noise_multiplier}: must be > 0 with dp = '{self.dp}' "
                "(without noise there is no guarantee; use dp = 'none')"
            )
        if s.constraint_list and self.dp == "dp-sgd":
            raise ConfigError(
                "run-config 'constraints' with 'dp' = 'dp-sgd': the constraint surrogates compare the examples of a "
                "batch (group means, in-batch retrieval), so one example's gradient depends on the others and "
                "DP-SGD's per-sample guarantee would not hold; use client-level DP (dp = central-server, ...)"
            )
        self._check_dp_codec()
        if self.max_epsilon > 0 and self.dp == "none":
            raise ConfigError("run-config 'max-epsilon' is set but 'dp' = 'none': there is no epsilon to budget")
        if self.dp == "dp-sgd":
            for name, spec in s.rank_plan.profiles.items():
                if float(spec.get("time-budget", 0)) > 0:
                    raise ConfigError(f"run-config 'client-profiles': profile '{name}' has a time-budget, which "
                                      "dp = 'dp-sgd' cannot honour (its ledger is charged for the planned steps)")
                if spec.get("precision") == "bf16":
                    raise ConfigError(f"run-config 'client-profiles': profile '{name}' trains in bf16, which "
                                      "dp = 'dp-sgd' (Opacus per-sample gradients in fp32) does not support")
        if s.resume and self.dp in ("dp-sgd", "local"):
            raise ConfigError(
                f"run-config 'resume' with 'dp' = '{self.dp}': each client's privacy ledger lives in its ClientApp's "
                "state, which a new run starts empty, so clients could spend their budget twice; start a new run"
            )

    def _check_dp_codec(self) -> None:
        """Refuse the (dp, codec) pairs whose guarantee would not hold (fedmm/privacy/update.py has the argument)."""
        codec = self.codec  # type: ignore[attr-defined]  # CompressionSettings
        if make_codec(codec).lossless:
            return
        if self.dp == "central-client":
            raise ConfigError(
                f"run-config 'codec' = '{codec}' with 'dp' = 'central-client': the server adds noise calibrated "
                "to the clipping norm to the update it decodes, Q(clipped update + error-feedback residual), and a "
                "lossy codec does not keep that within the norm (q2 alone nearly doubles it), so the reported "
                "epsilon would not hold; use dp = 'central-server' (it clips what it decodes) or codec = 'fp32'"
            )
        if self.dp == "distributed":
            raise ConfigError(
                f"run-config 'codec' = '{codec}' with 'dp' = 'distributed': each client's noise share would be "
                "encoded on its own by a lossy codec whose error is not bounded by the clipping norm, so the sum is "
                "not the mechanism the accountant charges; use codec = 'fp32' with 'secure-aggregation' = true "
                "(which rounds to integers itself), or dp = 'central-server' or 'local'"
            )
