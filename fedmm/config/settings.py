"""``Settings``: the run-config groups joined into one typed, validated object.

Each group (one file per concern) declares its keys and the rules over its
own keys; what spans groups lives here, on the joined class where every key
is a typed attribute: the values derived from several groups (the tier plan,
the client objective) and the pairings a run may not use, each refused with
its reason. ``SPEC`` (the key table the pyproject check reads) is derived
from the groups' fields.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from functools import cached_property

from .compression import CompressionSettings
from .constraints import ConstraintSettings
from .data import DataSettings
from .declare import Check, ConfigError, run_config_name
from .federation import FederationSettings
from .model import ModelSettings
from .privacy import PrivacySettings
from .run import RunSettings
from .secagg import REFUSED_DP, SECAGG_CLIP_NORM, SecureAggregationSettings
from .tiers import Profile, RankPlan, parse_profiles, parse_ranks
from .training import TrainingSettings

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


class Key(NamedTuple):
    """One run-config key as ``SPEC`` lists it (read off its field in its concern's file)."""

    type: type
    default: Any
    help: str
    check: Check | None
    concern: str  # the settings group that declares it


# Bases in reverse: a dataclass takes its bases' fields last-first, so the keys keep pyproject's order.
@dataclass(frozen=True)
class Settings(RunSettings, SecureAggregationSettings, CompressionSettings, ConstraintSettings, PrivacySettings,
               TrainingSettings, FederationSettings, DataSettings, ModelSettings):
    """Validated run settings; attribute names are the run-config keys in snake_case."""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None, *, server_files: bool = True) -> Settings:
        """Validate a flat run config (missing keys take their defaults).

        ``server_files`` = False (a ClientApp): the manifests only the server opens ('dataset' as the default
        of a site that brings its own, 'server-dataset') need not exist on this machine.
        """
        run_config = dict(run_config or {})
        unknown = sorted(set(run_config) - set(SPEC))
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, SPEC, n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(f"unknown run-config key(s): {', '.join(hints)}; known keys: {', '.join(SPEC)}")
        values: dict[str, Any] = {}
        for name, spec in SPEC.items():
            value = _coerce(name, spec, run_config.get(name, spec.default))
            if spec.check is not None:
                problem = spec.check(value)
                if problem:
                    raise ConfigError(f"run-config '{name}' = {value!r}: {problem}")
            values[name.replace("-", "_")] = value
        settings = cls(**values)
        settings._check_cross_field()
        if server_files:
            settings._check_server_files()
        return settings

    def _check_cross_field(self) -> None:
        self._check_model()
        self._check_privacy()
        self._check_run()
        self._check_asynchrony()
        self._check_tiers()
        self._check_privacy_pairings()
        self._check_secagg_pairings()
        self._check_asynchrony_pairings()

    # --- what spans groups: derived values, then the pairings a run may not use, each with its reason ------
    @cached_property
    def rank_plan(self) -> RankPlan:
        """The tiers, parsed once (config.tiers): model keys, and the training keys a tier may lower."""
        ranks = parse_ranks(self.lora_ranks)
        return RankPlan(
            lora_rank=self.lora_rank,
            client_ranks=tuple(ranks or [self.lora_rank]),
            profiles=parse_profiles(self.client_profiles),
            cycle=tuple(self.partition_profile_list),
            lora_targets=tuple(self.lora_target_list),
            batch_size=self.batch_size,
            local_steps=self.local_steps,
            ranks_given=bool(ranks),
        )

    @property
    def client_ranks(self) -> list[int]:
        return list(self.rank_plan.client_ranks)

    def rank_of(self, partition_id: int) -> int:
        return self.rank_plan.rank_of(partition_id)

    @property
    def global_rank(self) -> int:
        return self.rank_plan.global_rank

    def profile_for(self, partition_id: int, node_profile: str | None = None) -> Profile:
        try:
            return self.rank_plan.profile_for(partition_id, node_profile)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def objective(self) -> str:
        """The client loss actually used: 'clip', 'unicl' or 'public-negatives'."""
        if self.loss == "auto":
            return "public-negatives" if self.dp == "dp-sgd" else "clip"
        return self.loss

    @property
    def public_draw(self) -> int:
        """Public pairs the client objective draws at each step (0: it uses no public data)."""
        draws = {"unicl": self.public_captions, "public-negatives": self.dp_negatives}
        return draws.get(self.objective, 0)

    def _check_tiers(self) -> None:
        problem = self.rank_plan.problem()
        if problem:
            raise ConfigError(f"run-config {problem}")

    def _check_privacy_pairings(self) -> None:
        """DP with the loss, constraints, codec, tiers and resumption: every pairing whose guarantee would not
        hold is refused (fedmm/privacy/update.py has the codec argument)."""
        if self.dp == "dp-sgd" and self.loss in ("clip", "unicl"):
            raise ConfigError(
                f"run-config 'loss' = '{self.loss}' with 'dp' = 'dp-sgd': this loss uses the other pairs of a batch "
                "as negatives, so one example's gradient depends on the others and DP-SGD's per-sample guarantee "
                "does not hold; use loss = 'public-negatives' (or 'auto')"
            )
        if self.constraint_list and self.dp == "dp-sgd":
            raise ConfigError(
                "run-config 'constraints' with 'dp' = 'dp-sgd': the constraint surrogates compare the examples of a "
                "batch (group means, in-batch retrieval), so one example's gradient depends on the others and "
                "DP-SGD's per-sample guarantee would not hold; use client-level DP (dp = central-server, ...)"
            )
        if not self.uplink_codec.lossless and self.dp == "central-client":
            raise ConfigError(
                f"run-config 'codec' = '{self.codec}' with 'dp' = 'central-client': the server adds noise calibrated "
                "to the clipping norm to the update it decodes, Q(clipped update + error-feedback residual), and a "
                "lossy codec does not keep that within the norm (q2 alone nearly doubles it), so the reported "
                "epsilon would not hold; use dp = 'central-server' (it clips what it decodes) or codec = 'fp32'"
            )
        if not self.uplink_codec.lossless and self.dp == "distributed":
            raise ConfigError(
                f"run-config 'codec' = '{self.codec}' with 'dp' = 'distributed': each client's noise share would be "
                "encoded on its own by a lossy codec whose error is not bounded by the clipping norm, so the sum is "
                "not the mechanism the accountant charges; use codec = 'fp32' with 'secure-aggregation' = true "
                "(which rounds to integers itself), or dp = 'central-server' or 'local'"
            )
        if self.dp == "dp-sgd":
            for name, spec in self.rank_plan.profiles.items():
                if float(spec.get("time-budget", 0)) > 0:
                    raise ConfigError(f"run-config 'client-profiles': profile '{name}' has a time-budget, which "
                                      "dp = 'dp-sgd' cannot honour (its ledger is charged for the planned steps)")
                if spec.get("precision") == "bf16":
                    raise ConfigError(f"run-config 'client-profiles': profile '{name}' trains in bf16, which "
                                      "dp = 'dp-sgd' (Opacus per-sample gradients in fp32) does not support")
        if self.resume and self.dp in ("dp-sgd", "local"):
            raise ConfigError(
                f"run-config 'resume' with 'dp' = '{self.dp}': each client's privacy ledger lives in its ClientApp's "
                "state, which a new run starts empty, so clients could spend their budget twice; start a new run"
            )

    def _check_secagg_pairings(self) -> None:
        """Secure aggregation with the DP modes and codecs it can carry."""
        if self.dp == "distributed" and not self.secure_aggregation:
            raise ConfigError(
                "run-config 'dp' = 'distributed' needs 'secure-aggregation' = true: each client adds only a share "
                "of the noise, so without secure aggregation the server would see every update with a fraction "
                "of the noise it needs"
            )
        if not self.secure_aggregation:
            return
        if self.dp == "distributed" and self.secagg_clip_norm != SECAGG_CLIP_NORM:
            raise ConfigError(
                f"run-config 'secagg-clip-norm' = {self.secagg_clip_norm:g} with 'dp' = 'distributed': the bound is "
                "the DP clipping norm, which the noise is calibrated to; set 'dp-clip-norm' instead")
        if self.dp in REFUSED_DP:
            raise ConfigError(f"run-config 'secure-aggregation' with 'dp' = '{self.dp}': {REFUSED_DP[self.dp]}")
        if not self.uplink_codec.lossless:
            raise ConfigError(
                f"run-config 'secure-aggregation' with 'codec' = '{self.codec}': secure aggregation rounds each "
                "update to secagg-bits integers itself (stochastic rounding, unbiased), and a masked sum cannot be "
                "decoded per client; use codec = 'fp32' and set the width with 'secagg-bits'"
            )

    def _check_asynchrony_pairings(self) -> None:
        """What the asynchronous loop cannot honour with other groups' keys (docs/architecture.md)."""
        if not self.asynchronous:
            return
        if self.secure_aggregation:
            raise ConfigError("run-config 'secure-aggregation' with 'asynchronous': SecAgg+'s masks cancel only "
                              "in the sum of one cohort that shared keys in the same round, and a buffer that fills "
                              "from arrivals has no such cohort; use synchronous rounds")
        if self.delay_compensation > 0 and self.dp == "central-client":
            raise ConfigError("run-config 'delay-compensation' with 'dp' = 'central-client': the correction can "
                              "lengthen a client-clipped update beyond the clipping norm, and under central-client "
                              "DP the server does not clip again; use dp = 'central-server' (it clips after the "
                              "correction) or delay-compensation = 0")

    def to_run_config(self) -> dict[str, Any]:
        """The flat run-config form (round-trips through ``from_run_config``)."""
        return {name: getattr(self, name.replace("-", "_")) for name in SPEC}


def _concern(field_owner: type) -> str:
    return field_owner.__name__.removesuffix("Settings").lower()


def _spec() -> dict[str, Key]:
    owners = {f.name: group for group in reversed(Settings.__mro__[1:-1]) for f in fields(group)}
    return {
        run_config_name(f.name): Key(_TYPES[f.type] if isinstance(f.type, str) else f.type, f.default,
                                     f.metadata["help"], f.metadata["check"], _concern(owners[f.name]))
        for f in fields(Settings)
    }


SPEC: dict[str, Key] = _spec()


def _coerce(name: str, spec: Key, value: Any) -> Any:
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if spec.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, spec.type) or (spec.type is not bool and isinstance(value, bool)):
        raise ConfigError(f"run-config '{name}' = {value!r}: expected {spec.type.__name__}, got {type(value).__name__}")
    return value


