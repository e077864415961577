"""Waiting without computing: a tier's ``delay`` (a slower device, real in wall time; config/tiers.py).

``wait(seconds)`` sleeps. A process that shares CPU slots among co-located sites (the deployment launcher's
ClientApp worker: fedmm/deploy/core_slots.py) lends its slot back for the wait through ``lend_during_waits``,
so a site that only waits never keeps another one from training, as on machines of their own it would not.
Elsewhere (the simulation engine, a site on its own machine) a wait is a plain sleep.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import ContextManager

_lender = threading.local()  # per thread: the ClientApp runs in the thread of the worker that holds the slot


def wait(seconds: float) -> None:
    """Sleep ``seconds``, holding no shared CPU slot meanwhile."""
    lend: Callable[[], ContextManager[None]] | None = getattr(_lender, "lend", None)
    with lend() if lend is not None else contextlib.nullcontext():
        time.sleep(seconds)


@contextlib.contextmanager
def lend_during_waits(lend: Callable[[], ContextManager[None]]) -> Iterator[None]:
    """While inside, every ``wait`` of this thread runs inside ``lend()`` (e.g. a core slot given back)."""
    previous = getattr(_lender, "lend", None)
    _lender.lend = lend
    try:
        yield
    finally:
        _lender.lend = previous
