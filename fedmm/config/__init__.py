"""Run config -> one typed, validated settings object.

Each run-config key is declared once (type, default, help, check), as a
field of its concern's settings group, one file per concern:
``config/model.py`` (model, base weights, LoRA, tiers), ``data.py``,
``federation.py``, ``training.py``, ``privacy.py``, ``constraints.py``,
``compression.py``, ``secagg.py``, ``run.py`` (``text.py``: the ``k=v`` text form). ``Settings`` joins the groups, and ``SPEC``
(the key table the pyproject check reads) is derived from their fields. A
field is ``key(default, help, check)`` and its annotation is the key's type;
the rules that involve a group's keys are its ``_check_<concern>`` methods,
beside them. ``Settings.from_run_config`` rejects unknown keys (with "did you mean"), ill-typed values and
out-of-range values with an error naming the key, then each group's
cross-field rules, so an invalid run fails in the ServerApp before any client
is contacted. No other module reads the run config or the environment.

Layering: this package imports only leaves of the library (``fedmm.protocol``,
``fedmm.compression``'s codec specs, ``fedmm.faults``, ``fedmm.asynchrony``'s staleness parser, and ``fedmm.model``'s
registry for the model-name check); nothing above it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from .declare import Check, ConfigError, run_config_name
from .compression import CompressionSettings
from .constraints import ConstraintSettings
from .data import PARTITIONERS, DataSettings
from .federation import FederationSettings
from .model import ModelSettings
from .privacy import DP_MODES, PrivacySettings
from .run import RunSettings
from .secagg import SecureAggregationSettings
from .training import LOCAL_OPTIMIZERS, LOSSES, TrainingSettings
from .tiers import PROFILE_KEYS, Profile, RankPlan, parse_profiles

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
        self._check_compression()
        self._check_privacy()
        self._check_secagg()
        self._check_tiers()
        self._check_run()
        self._check_asynchrony()

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


__all__ = [
    "ConfigError", "DP_MODES", "Key", "LOCAL_OPTIMIZERS", "LOSSES", "PARTITIONERS", "PROFILE_KEYS", "Profile",
    "RankPlan", "SPEC", "Settings", "parse_profiles",
]
