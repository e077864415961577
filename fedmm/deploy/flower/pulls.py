"""Shorter retries for a message's objects its sender is still pushing, and Flower's entry points run in-process.

A reply is visible to the ServerApp's pull as soon as its message is
pushed, before its arrays are, and the SuperNode hands a task to its
ClientApp before it has fetched the message's objects. Flower retries a
missing object after 1 s, then 2, 4, 8 (``PULL_INITIAL_BACKOFF``,
``PULL_BACKOFF_CAP``): a process that polls often (the ServerApp every
0.25 s, a warm ClientApp worker) would sit out that back-off on most
messages. Here the first retry comes after 0.05 s and the longest wait is
0.5 s, with proportionally more tries, so Flower's patience for a slow
sender is kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

# First retry and longest wait (s) for an object its sender is still pushing
PULL_BACKOFF = (0.05, 0.5)


def short_object_pull_backoff(module: ModuleType) -> None:
    """Make the ``pull_objects`` that ``module`` calls retry a missing object after ``PULL_BACKOFF`` (idempotent)."""
    from flwr.supercore.constant import PULL_BACKOFF_CAP, PULL_MAX_TRIES_PER_OBJECT

    pull = module.pull_objects
    if getattr(pull, "short_backoff", False):
        return

    def pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        kwargs.setdefault("initial_backoff", PULL_BACKOFF[0])
        kwargs.setdefault("backoff_cap", PULL_BACKOFF[1])
        kwargs.setdefault("max_tries_per_object", int(PULL_MAX_TRIES_PER_OBJECT * PULL_BACKOFF_CAP / PULL_BACKOFF[1]))
        return pull(*args, **kwargs)

    setattr(pull_objects, "short_backoff", True)
    setattr(module, "pull_objects", pull_objects)


def run_entry_point(command: str, entry_point: Callable[[], None], args: list[str]) -> int:
    """Run Flower's ``command`` (its console entry point) in this process with ``args``; its exit code."""
    sys.argv = [command, *args]
    try:
        entry_point()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0
