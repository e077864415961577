"""Core slots: SuperNodes that share one machine run at most K ClientApp tasks at a time, longest first.

A rehearsal puts every site on one machine (``fedmm run --deployment``). Ten
sites training at once on two cores each get a fifth of a core, all of them
finish last, and the SuperLink, the ServerApp and the SuperNodes' own
transfers queue behind them (docs/benchmarks-log.md measures the slowdown).
The simulation engine avoids that by giving each client its CPUs (``client-resources-num-cpus``): two clients at a time on two cores.
Core slots are the same rule for the deployment engine: a folder of K lock
files that every worker on the machine shares; a task's ClientApp call holds
one (``fcntl.flock``: released by the OS if the process dies). Sites on their
own machines need none.

Waiters queue in order of arrival minus the seconds they expect their task
to take (the worker's last task of the same kind): tasks of one round arrive
within a few seconds of each other, so the longest go first and the short
ones fill the end, where a long task started last leaves the other slot
idle (docs/benchmarks-log.md compares this order with arrival and random
order on the default job). A task never waits behind one that arrived more than its own expected
length later, so none starves.

Only the waiter at the head of the queue looks for a free slot; every other
one sleeps in the kernel on the lock of the ticket just ahead of it (a
blocking ``flock``) and looks again when that waiter leaves or dies: waiters
that each polled the slots woke often enough to preempt the training
processes they were waiting for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

WAIT = 0.05  # seconds between the head's tries while every slot is taken
QUEUE = "queue"  # the waiters' tickets: one file each, locked by its waiter; not a slot (slot files are slot-*)
QUEUE_LOCK = "queue.lock"  # taken to join the queue and to read it, so no one sees a ticket before it is locked
_KEY_OFFSET = 10**18  # keeps a ticket's key positive for any expected length, so names sort as numbers


def make_core_slots(folder: Path, count: int) -> Path:
    """A folder of ``count`` slot files (existing ones are kept)."""
    if count < 1:
        raise ValueError(f"core slots: count = {count}: need at least one")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"slot-{i}").touch()
    (folder / QUEUE).mkdir(exist_ok=True)
    (folder / QUEUE_LOCK).touch()
    return folder


class HeldSlot:
    """One of a folder's slots while its holder runs (no folder: no limit, nothing held).

    ``waited``: the seconds spent waiting for it; ``released()`` gives it back for a wait that uses no CPU (a
    tier's delay, fedmm/pacing.py) and takes one again after, in the queue like any waiter.
    """

    def __init__(self, folder: Path | None, expected_seconds: float) -> None:
        self.folder, self.expected_seconds, self.waited = folder, expected_seconds, 0.0
        self._slots = sorted(folder.glob("slot-*")) if folder is not None else []
        if folder is not None and not self._slots:
            raise ValueError(f"core slots: no slot files in {folder}")
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        if self.folder is None:
            return
        start = time.perf_counter()
        ticket = _Ticket(self.folder, self.expected_seconds)
        try:
            self._handle = ticket.wait_for_slot(self._slots)
        finally:
            ticket.leave()
        self.waited += time.perf_counter() - start

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        self.release()
        try:
            yield
        finally:
            self.acquire()


@contextlib.contextmanager
def core_slot(folder: Path | None, expected_seconds: float = 0.0) -> Iterator[HeldSlot]:
    """Hold one of ``folder``'s slots (none: no limit) while inside.

    ``expected_seconds``: how long the caller expects to hold it; among waiters that arrived together the
    longest goes first.
    """
    slot = HeldSlot(folder, expected_seconds)
    slot.acquire()
    try:
        yield slot
    finally:
        slot.release()


class _Ticket:
    """A waiter's place in the queue: a file named by its key, locked while the waiter lives."""

    def __init__(self, folder: Path, expected_seconds: float) -> None:
        self.folder, self.queue = folder, folder / QUEUE
        self.queue.mkdir(exist_ok=True)
        with self._queue_locked():
            key = time.monotonic_ns() - int(expected_seconds * 1e9) + _KEY_OFFSET
            self.name = f"{key:020d}-{os.getpid()}-{threading.get_ident()}"
            self.handle: IO[str] = open(self.queue / self.name, "w")
            fcntl.flock(self.handle, fcntl.LOCK_EX)

    def wait_for_slot(self, slots: list[Path]) -> IO[str]:
        """An open, locked slot file, taken once this ticket is at the head of the queue."""
        while True:
            ahead = self._ahead()
            if ahead is not None:
                _wait_until_gone(self.queue / ahead)
                continue
            for path in slots:
                handle = open(path, "a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                return handle
            time.sleep(WAIT)

    def leave(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.queue / self.name).unlink()
        self.handle.close()  # releases the lock: the waiter behind this one looks again

    def _ahead(self) -> str | None:
        """The live ticket just ahead of this one (None: this one is the head); dead ones are removed."""
        with self._queue_locked():
            ahead = None
            for name in sorted(os.listdir(self.queue)):
                if name == self.name:
                    return ahead
                if _alive(self.queue / name):
                    ahead = name
        raise RuntimeError(f"core slots: this waiter's ticket {self.name} left {self.queue}")

    @contextlib.contextmanager
    def _queue_locked(self) -> Iterator[None]:
        with open(self.folder / QUEUE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # closing the file releases the lock


def _alive(ticket: Path) -> bool:
    """Whether the ticket's waiter still holds it; a dead waiter's ticket is removed."""
    try:
        with open(ticket) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileNotFoundError):
        ticket.unlink()
    return False


def _wait_until_gone(ticket: Path) -> None:
    """Sleep in the kernel until the ticket's waiter leaves the queue or dies."""
    try:
        with open(ticket) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)  # granted once its waiter closed (or lost) its exclusive lock
    except FileNotFoundError:
        pass
