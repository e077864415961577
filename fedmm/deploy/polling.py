"""Shorter waits in Flower's message polling, on both ends of a deployment.

Flower 1.41 (and 1.42) moves messages by polling: a SuperNode with nothing to do asks
the SuperLink for a message every 3 s, and the ServerApp's ``HttpGrid`` asks
for replies every 3 s. Each exchange (the train messages out, their replies
back; then the evaluate ones) waits about half of each interval on average,
so a deployment round spent ~6 s (up to ~12 s) idle. Both waits are fedmm's
to shorten without touching Flower's protocol:

- ``PolledGrid`` wraps the deployment ServerApp's ``HttpGrid`` and pulls
  replies every ``interval`` seconds (the same loop as Flower's
  ``send_and_receive``); the simulation engine's ``InMemoryGrid`` polls
  every 0.1 s, in memory, and is left as it is;
- ``shorten_idle_poll`` makes a SuperNode started in this process back off
  from ``NODE_IDLE_POLL`` (0.5 s) to Flower's 3 s between empty pulls,
  doubling the wait after each empty pull and starting again at 0.5 s once
  a pull brought work (``fedmm supernode``);
- ``Wakeup`` pipes join that SuperNode and its ClientApp worker
  (``fedmm/deploy/supernode.py``), which otherwise find each other's work by
  polling too: the worker asked for a task every 0.1-2 s, and the SuperNode
  checked for the finished reply every 0.5 s. Now the SuperNode wakes the
  worker as soon as it has stored a message, and the worker wakes the
  SuperNode as soon as it has pushed the reply; the polls stay, as the
  fallback, at their old pace;
- ``short_object_pull_backoff`` makes the ServerApp and the SuperNode retry
  an object its sender has not finished pushing after 0.05 s instead of
  Flower's 1 s (``PULL_INITIAL_BACKOFF``). A reply is visible to the
  ServerApp's pull as soon as its message is pushed, before its arrays are,
  so a ServerApp that polls every 0.25 s often found a reply's objects
  missing and slept a whole second (15 retries for 40 replies in a 2-round
  job on 10 nodes), the phase's last reply, which ends the phase, among them.

Each poll is one small HTTPS request to the SuperLink, and it is not cheap:
ten idle SuperNodes polling every 0.5 s kept 33% of a core busy in the
SuperLink and 17% in the SuperNodes (docs/benchmarks.md, "Polls that back off"),
CPU a rehearsal's training on the same two cores lost. Backing off keeps the
quick pickup right after a message (the next one of a round is often near)
and costs an idle node what Flower's own 3 s poll costs.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.constant import PULL_BACKOFF_CAP, PULL_MAX_TRIES_PER_OBJECT

FLOWER_IDLE_WAIT = 3  # flwr/supernode/start_client_internal.py: the sleep after a pull that found no message
SERVER_PULL_INTERVAL = 0.25
NODE_IDLE_POLL = 0.5
WORK_GAP = 0.5  # s between two idle waits beyond which the loop did work (an empty pull is one small request)
# First retry and longest wait (s) for an object its sender is still pushing; Flower's are 1 s and 10 s
# (flwr/supercore/constant.py). More tries at the shorter waits keep Flower's patience for a slow sender.
PULL_BACKOFF = (0.05, 0.5)


class PolledGrid(Grid):
    """A Grid that pulls replies every ``interval`` s; everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, interval: float = SERVER_PULL_INTERVAL) -> None:
        self.grid, self.interval = grid, interval

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(self.interval)
        return replies


def polled(grid: Grid) -> Grid:
    """``grid`` with short reply polling, unless it already polls often (Flower's ``InMemoryGrid``)."""
    interval = getattr(grid, "pull_interval", None)
    if interval is not None and interval <= SERVER_PULL_INTERVAL:
        return grid
    from flwr.superlink.grid import http_grid

    short_object_pull_backoff(http_grid)
    return PolledGrid(grid)


def short_object_pull_backoff(module: ModuleType) -> None:
    """Make the ``pull_objects`` that ``module`` calls retry a missing object after ``PULL_BACKOFF`` (idempotent)."""
    pull = module.pull_objects
    if getattr(pull, "short_backoff", False):
        return

    def pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        kwargs.setdefault("initial_backoff", PULL_BACKOFF[0])
        kwargs.setdefault("backoff_cap", PULL_BACKOFF[1])
        kwargs.setdefault("max_tries_per_object", int(PULL_MAX_TRIES_PER_OBJECT * PULL_BACKOFF_CAP / PULL_BACKOFF[1]))
        return pull(*args, **kwargs)

    pull_objects.short_backoff = True  # type: ignore[attr-defined]
    module.pull_objects = pull_objects


class Wakeup:
    """A pipe that lets one process cut another's wait short: ``notify`` on one end, ``wait`` on the other.

    A process that holds only one end passes ``None`` for the other. Writes never block: a full pipe
    already holds a pending wake-up, and a closed one belongs to a process that is gone.
    """

    def __init__(self, read_fd: int | None = None, write_fd: int | None = None) -> None:
        if read_fd is None and write_fd is None:
            read_fd, write_fd = os.pipe()
        self.read_fd, self.write_fd = read_fd, write_fd
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.set_blocking(fd, False)

    def notify(self) -> None:
        if self.write_fd is None:
            raise ValueError("Wakeup: this end cannot notify (no write end)")
        try:
            os.write(self.write_fd, b"!")
        except (BlockingIOError, BrokenPipeError):
            pass

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; True if notified (every pending wake-up is consumed)."""
        if self.read_fd is None:
            raise ValueError("Wakeup: this end cannot wait (no read end)")
        ready, _, _ = select.select([self.read_fd], [], [], max(timeout, 0.0))
        if not ready:
            return False
        try:
            while os.read(self.read_fd, 4096):  # b"": the writer closed its end; still a wake-up
                pass
        except BlockingIOError:
            pass
        return True


class _ShortIdleWait:
    """The ``time`` module as Flower's SuperNode loop sees it: its idle wait backs off from ``idle`` to 3 s;
    its other waits (for the ClientApp's reply) end early when ``reply_pushed`` is notified."""

    def __init__(self, idle: float, reply_pushed: Wakeup | None = None) -> None:
        self.idle = idle
        self.reply_pushed = reply_pushed
        self.wait = idle
        self.last = float("-inf")  # when the previous idle wait ended

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds != FLOWER_IDLE_WAIT:
            if self.reply_pushed is None:
                time.sleep(seconds)
            else:
                self.reply_pushed.wait(seconds)  # the loop checks again whatever woke it
            return
        # An empty pull follows the previous idle wait at once; a longer gap means the loop handled a
        # message in between: poll quickly again.
        now = time.monotonic()
        self.wait = self.idle if now - self.last > WORK_GAP else min(2 * self.wait, FLOWER_IDLE_WAIT)
        time.sleep(self.wait)
        self.last = time.monotonic()


def shorten_idle_poll(idle: float = NODE_IDLE_POLL, *, reply_pushed: Wakeup | None = None,
                      message_stored: Wakeup | None = None) -> ModuleType:
    """Make the SuperNode loop of this process back off from ``idle`` s to 3 s between empty pulls, end its
    wait for a reply when ``reply_pushed`` is notified, and notify ``message_stored`` after each message it
    has stored for the ClientApp; returns the patched module."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = _ShortIdleWait(idle, reply_pushed)  # that module's name: time is untouched
    short_object_pull_backoff(start_client_internal)
    if message_stored is not None:
        start_client_internal._pull_and_store_message = _notifying(  # pylint: disable=protected-access
            start_client_internal._pull_and_store_message, message_stored)  # pylint: disable=protected-access
    return start_client_internal


def _notifying(pull_and_store: Callable[..., Any], message_stored: Wakeup) -> Callable[..., Any]:
    def pull_and_store_then_notify(*args: Any, **kwargs: Any) -> Any:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:  # a message (and its objects) is in the node's store: its task can start
            message_stored.notify()
        return run_id

    return pull_and_store_then_notify
