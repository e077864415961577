"""Core slots: SuperNodes that share one machine run at most K ClientApp tasks at a time.

A rehearsal puts every site on one machine (``fedmm run --deployment``). Ten
sites training at once on two cores each get a fifth of a core, all of them
finish last, and the SuperLink, the ServerApp and the SuperNodes' own
transfers queue behind them (docs/benchmarks.md: 6.7 s per local step against
1.1 s in simulation). The simulation engine avoids that by giving each client
its CPUs (``client-resources-num-cpus``): two clients at a time on two cores.
Core slots are the same rule for the deployment engine: a folder of K lock
files that every worker on the machine shares; a task's ClientApp call holds
one (``fcntl.flock``: released by the OS if the process dies). Sites on their
own machines need none.

Only one waiter at a time looks for a free slot: the others sleep in the
kernel on the folder's turnstile lock (a blocking ``flock``), so eight sites
waiting for two slots wake nothing. When each of them polled the slots every
``WAIT`` s, their wake-ups (160 a second) preempted the two training
processes (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

WAIT = 0.05  # seconds between the turnstile holder's tries while every slot is taken
TURNSTILE = "turnstile"  # the lock the waiters queue on; not a slot (slot files are slot-*)


def make_core_slots(folder: Path, count: int) -> Path:
    """A folder of ``count`` slot files (existing ones are kept)."""
    if count < 1:
        raise ValueError(f"core slots: count = {count}: need at least one")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"slot-{i}").touch()
    (folder / TURNSTILE).touch()
    return folder


@contextlib.contextmanager
def core_slot(folder: Path | None) -> Iterator[float]:
    """Hold one of ``folder``'s slots (none: no limit); yields the seconds waited for it."""
    if folder is None:
        yield 0.0
        return
    slots = sorted(folder.glob("slot-*"))
    if not slots:
        raise ValueError(f"core slots: no slot files in {folder}")
    start = time.perf_counter()
    with open(folder / TURNSTILE, "a") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # blocks; released by the OS if this process dies
        try:
            handle = _take_free_slot(slots)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
    try:
        yield time.perf_counter() - start
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _take_free_slot(slots: list[Path]) -> IO[str]:
    """An open, locked slot file: the first free one, trying every ``WAIT`` s until one is."""
    while True:
        for path in slots:
            handle = open(path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return handle
        time.sleep(WAIT)
