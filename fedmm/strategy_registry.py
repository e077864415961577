"""Strategy registry: Flower Message-API strategies found by name.

Strategies register under the ``fedmm.strategies`` entry-point group (fedmm's
built-ins included, see pyproject.toml), so a method author's package adds
one without a fork. ``build_strategy`` selects by the run config's
``strategy`` name and fills the constructor from fedmm's settings plus the
user's ``strategy-args``; an unknown name, an unknown or ill-typed argument,
or a value out of its range fails with the valid choices listed.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp.strategy import Strategy

GROUP = "fedmm.strategies"
_SIMPLE = (bool, int, float, str)

# Constructor arguments fedmm fills from its own run-config keys and record
# conventions (server/chain.py: build_strategy); not settable via strategy-args.
MANAGED = frozenset({
    "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
    "min_available_nodes", "proximal_mu", "client_learning_rate", "weighted_by_key",
    "arrayrecord_key", "configrecord_key", "train_loss_key",
    "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn",
})


def wrapper_chain(strategy: Strategy) -> Iterator[Strategy]:
    """The strategy, then each one it wraps (``.strategy``), innermost last."""
    current: object = strategy
    while isinstance(current, Strategy):
        yield current
        current = getattr(current, "strategy", None)


def innermost(strategy: Strategy) -> Strategy:
    """The strategy inside fedmm's wrappers (compression, privacy): what the user selected."""
    *_, inner = wrapper_chain(strategy)
    return inner


def available() -> dict[str, Any]:
    """name -> entry point of every installed strategy."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(name: str) -> type[Strategy]:
    found = available()
    if name not in found:
        raise ValueError(
            f"run-config 'strategy': unknown strategy '{name}'; installed: {', '.join(sorted(found))}"
        )
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"strategy '{name}' ({found[name].value}) is not a flwr Strategy subclass")
    return cls


def parameters(cls: type[Strategy]) -> dict[str, tuple[Any, Any]]:
    """Constructor parameters settable from the run config: name -> (type, default)."""
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = hints.get(name)
        if kind in _SIMPLE:
            out[name] = (kind, p.default)
    return out


def describe(name: str) -> tuple[str, dict[str, tuple[Any, Any]]]:
    """One-line description and settable parameters of an installed strategy."""
    cls = load(name)
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    return (doc[0] if doc else cls.__name__), parameters(cls)


def _coerce(strategy: str, key: str, kind: type, value: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(
            f"run-config 'strategy-args': {strategy} argument '{key}' = {value!r} must be {kind.__name__}"
        )
    return value


def build_strategy(
    name: str,
    args: Mapping[str, Any],
    managed: Mapping[str, Any],
    ranges: Mapping[str, tuple[Any, str]] | None = None,
) -> Strategy:
    """Instantiate ``name``.

    ``managed``: arguments fedmm sets from its own settings (sampling, metric
    hooks, FedProx's mu, ...), passed where the constructor accepts them and
    not overridable through ``args`` (the user sets those run-config keys).
    ``args``: the user's ``strategy-args``, checked against the signature.
    ``ranges``: parameter -> (check, valid range) applied to the final values.
    """
    cls = load(name)
    settable = parameters(cls)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in managed.items() if k in accepted}
    for raw_key, value in args.items():
        key = raw_key.replace("-", "_")
        if key in managed:
            raise ValueError(
                f"run-config 'strategy-args': '{raw_key}' is set by fedmm from its own run-config keys"
            )
        if key not in settable:
            known = ", ".join(f"{k}={d!r}" for k, (_, d) in settable.items() if k not in managed) or "none"
            raise ValueError(
                f"run-config 'strategy-args': {name} has no argument '{raw_key}'; its arguments: {known}"
            )
        kwargs[key] = _coerce(name, key, settable[key][0], value)
    missing = [k for k, p in accepted.items() if k != "self" and p.default is p.empty and k not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise ValueError(f"run-config 'strategy-args': {name} needs {', '.join(missing)}")
    for key, value in kwargs.items():
        if ranges and key in ranges and isinstance(value, (int, float)) and not ranges[key][0](value):
            origin = "strategy-args" if key not in managed else key.replace("_", "-")
            raise ValueError(f"run-config '{origin}': {name} {key} = {value} must be {ranges[key][1]}")
    return cls(**kwargs)
