"""Shorter waits in Flower's message polling, on both ends of a deployment.

Flower 1.41 moves messages by polling: a SuperNode with nothing to do asks
the SuperLink for a message every 3 s, and the ServerApp's ``HttpGrid`` asks
for replies every 3 s. Each exchange (the train messages out, their replies
back; then the evaluate ones) waits about half of each interval on average,
so a deployment round spent ~6 s (up to ~12 s) idle. Both waits are fedmm's
to shorten without touching Flower's protocol:

- ``PolledGrid`` wraps the ServerApp's grid and pulls replies every
  ``interval`` seconds (the same loop as Flower's ``send_and_receive``). Under
  ``flwr run`` the ServerApp gets an ``HttpGrid`` in the simulation engine
  too, so both engines poll at 0.25 s; only the ``InMemoryGrid`` of Flower's
  deprecated ``run_simulation`` (0.1 s) is left as it is;
- ``shorten_idle_poll`` makes a SuperNode started in this process back off
  from ``NODE_IDLE_POLL`` (0.5 s) to Flower's 3 s between empty pulls,
  doubling the wait after each empty pull and starting again at 0.5 s once
  a pull brought work (``fedmm supernode``).

Each poll is one small HTTPS request to the SuperLink, and it is not cheap:
ten idle SuperNodes polling every 0.5 s kept 33% of a core busy in the
SuperLink and 17% in the SuperNodes (docs/benchmarks.md, "Polls that back off"),
CPU a rehearsal's training on the same two cores lost. Backing off keeps the
quick pickup right after a message (the next one of a round is often near)
and costs an idle node what Flower's own 3 s poll costs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

FLOWER_IDLE_WAIT = 3  # flwr/supernode/start_client_internal.py: the sleep after a pull that found no message
SERVER_PULL_INTERVAL = 0.25
NODE_IDLE_POLL = 0.5
WORK_GAP = 0.5  # s between two idle waits beyond which the loop did work (an empty pull is one small request)


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
    return grid if interval is not None and interval <= SERVER_PULL_INTERVAL else PolledGrid(grid)


class _ShortIdleWait:
    """The ``time`` module as Flower's SuperNode loop sees it: its idle wait backs off from ``idle`` to 3 s."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.wait = idle
        self.last = float("-inf")  # when the previous idle wait ended

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds != FLOWER_IDLE_WAIT:
            time.sleep(seconds)
            return
        # An empty pull follows the previous idle wait at once; a longer gap means the loop handled a
        # message in between: poll quickly again.
        now = time.monotonic()
        self.wait = self.idle if now - self.last > WORK_GAP else min(2 * self.wait, FLOWER_IDLE_WAIT)
        time.sleep(self.wait)
        self.last = time.monotonic()


def shorten_idle_poll(idle: float = NODE_IDLE_POLL) -> ModuleType:
    """Make the SuperNode loop of this process back off from ``idle`` s to 3 s between empty pulls; returns
    the patched module."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = _ShortIdleWait(idle)  # only that module's name: time itself is untouched
    return start_client_internal
