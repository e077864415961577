"""fedmm's strategies: Flower's built-ins (``builtin``), the LoRA-aware ones (one per file), and the
wrappers the server chains around any of them (``server/chain.py`` builds the chain).

The registry that finds a strategy by name (``fedmm.strategies`` entry points, ``strategy-args``
checks) is the library's, ``fedmm/strategy_registry.py`` (the ``fedmm`` command lists strategies
without importing this package); its names are re-exported here.
"""

from fedmm.strategy_registry import (
    GROUP,
    MANAGED,
    available,
    build_strategy,
    describe,
    innermost,
    load,
    parameters,
    wrapper_chain,
)

__all__ = ["GROUP", "MANAGED", "available", "build_strategy", "describe", "innermost", "load", "parameters",
           "wrapper_chain"]
