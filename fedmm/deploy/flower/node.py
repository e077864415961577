"""``python -m fedmm.deploy.flower.node [--wake-fds R,W] <flower-supernode options>``: Flower's SuperNode,
idle poll shortened, joined to its ClientApp worker.

What ``fedmm supernode`` starts beside its ClientApp worker: Flower's own
``flower-supernode`` entry point with every option passed through, after
``shorten_idle_poll``:

- Flower's loop sleeps a fixed wait (3 s) after every pull that brought no
  message. Here that wait backs off from ``NODE_IDLE_POLL`` (0.5 s) to
  Flower's, doubling after each empty pull and starting again once a pull
  brought work: the quick pickup right after a message (the next one of a
  round is often near), and an idle node's cost of Flower's own poll. The
  idle wait is recognised by where it falls (the sleep right after an empty
  pull, ``contract.idle_waits``), not by its value;
- with ``--wake-fds R,W`` (two inherited pipe ends, ``fedmm/deploy/wakeup.py``)
  the loop's other waits (for the ClientApp's reply) end as soon as the
  worker says through R that it pushed the reply, and the node tells the
  worker through W as soon as a message is stored;
- objects a sender is still pushing are retried after 0.05 s (``pulls.py``).

Without usable internals (``fedmm.deploy.flower.internals_usable``) this module
is never started: ``fedmm supernode`` runs stock ``flower-supernode`` instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..wakeup import Wakeup
from .pulls import run_entry_point, short_object_pull_backoff

WAKE_FDS = "--wake-fds"
NODE_IDLE_POLL = 0.5


class _ShortIdleWait:
    """The ``time`` module as Flower's SuperNode loop sees it: the wait after an empty pull backs off from
    ``idle`` to Flower's own; its other waits (for the ClientApp's reply) end early when ``reply_pushed``
    is notified."""

    def __init__(self, idle: float, reply_pushed: Wakeup | None = None) -> None:
        self.idle = idle
        self.reply_pushed = reply_pushed
        self.wait = idle
        self.after_empty_pull = False  # set by the pull wrapper: the next sleep is the loop's idle wait
        self.streak = False  # no message since the last idle wait: back off further

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def pulled(self, found_message: bool) -> None:
        self.after_empty_pull = not found_message
        if found_message:
            self.streak = False

    def sleep(self, seconds: float) -> None:
        if not self.after_empty_pull:
            if self.reply_pushed is None:
                time.sleep(seconds)
            else:
                self.reply_pushed.wait(seconds)  # the loop checks again whatever woke it
            return
        self.after_empty_pull = False
        self.wait = min(2 * self.wait, seconds) if self.streak else min(self.idle, seconds)
        self.streak = True
        time.sleep(self.wait)


def shorten_idle_poll(idle: float = NODE_IDLE_POLL, *, reply_pushed: Wakeup | None = None,
                      message_stored: Wakeup | None = None) -> ModuleType:
    """Make the SuperNode loop of this process back off from ``idle`` s to Flower's wait between empty pulls,
    end its wait for a reply when ``reply_pushed`` is notified, and notify ``message_stored`` after each
    message it has stored for the ClientApp; returns the patched module."""
    from flwr.supernode import start_client_internal

    waits = _ShortIdleWait(idle, reply_pushed)
    setattr(start_client_internal, "time", waits)  # that module's name: time is untouched
    short_object_pull_backoff(start_client_internal)
    setattr(start_client_internal, "_pull_and_store_message", _reporting(
        start_client_internal._pull_and_store_message, waits, message_stored))  # pylint: disable=protected-access
    return start_client_internal


def _reporting(pull_and_store: Callable[..., Any], waits: _ShortIdleWait,
               message_stored: Wakeup | None) -> Callable[..., Any]:
    def pull_and_store_then_report(*args: Any, **kwargs: Any) -> Any:
        run_id = pull_and_store(*args, **kwargs)
        waits.pulled(run_id is not None)
        if run_id is not None and message_stored is not None:  # a message and its objects are stored
            message_stored.notify()
        return run_id

    return pull_and_store_then_report


def main(argv: list[str]) -> int:
    from flwr.supernode.cli import flower_supernode

    if argv[:1] == [WAKE_FDS]:
        read_fd, write_fd = (int(fd) for fd in argv[1].split(","))
        argv = argv[2:]
        shorten_idle_poll(reply_pushed=Wakeup(read_fd=read_fd), message_stored=Wakeup(write_fd=write_fd))
    else:
        shorten_idle_poll()
    return run_entry_point("flower-supernode", flower_supernode, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
