"""Strategy registry: Flower Message-API strategies found by name.

Strategies register under the ``fedmm.strategies`` entry-point group (fedmm's
built-ins included, see pyproject.toml), so a method author's package adds
one without a fork. ``build_strategy`` selects by the run config's
``strategy`` name and fails with the known names when it is unknown.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp.strategy import Strategy

GROUP = "fedmm.strategies"


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


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """Instantiate strategy ``name`` with keyword arguments (e.g. sampling, aggregation fns)."""
    return load(name)(**kwargs)
