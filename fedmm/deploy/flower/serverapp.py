"""``flwr-serverapp`` as the SuperExec of ``fedmm superlink`` starts it: Flower's, pulling replies often.

Flower's deployment ServerApp (``HttpGrid.send_and_receive``) asks the
SuperLink for replies every 3 s, so each exchange of a round (train
messages out and their replies back, then the evaluate ones) waited about
half of that on average after its last reply arrived. Here the same loop
pulls every ``SERVER_PULL_INTERVAL`` s, through the grid's own
``push_messages``/``pull_messages``, and a reply whose arrays are still
being pushed is retried after 0.05 s (``pulls.py``). The simulation
engine's ``InMemoryGrid`` polls every 0.1 s in memory and is not touched:
the ServerApp's own code never imports this module.

``link.py`` puts a ``flwr-serverapp`` script that runs ``main`` first on
the PATH of the SuperLink it starts, which is where the SuperExec looks for
it (``contract._server_grid``).
"""

from __future__ import annotations

import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .pulls import run_entry_point, short_object_pull_backoff

SERVER_PULL_INTERVAL = 0.25
COMMAND = "flwr-serverapp"


def send_and_receive(grid: Any, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
    """Flower's ``send_and_receive`` loop, pulling every ``SERVER_PULL_INTERVAL`` s."""
    pending = set(grid.push_messages(messages))
    end = time.time() + (timeout if timeout is not None else 0.0)
    replies: list[Any] = []
    while timeout is None or time.time() < end:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        time.sleep(SERVER_PULL_INTERVAL)
    return replies


def poll_replies_often() -> None:
    """Make this process's ``HttpGrid`` pull replies every ``SERVER_PULL_INTERVAL`` s and retry objects sooner."""
    from flwr.superlink.grid import http_grid

    setattr(http_grid.HttpGrid, "send_and_receive", send_and_receive)
    short_object_pull_backoff(http_grid)


def install(folder: Path) -> Path:
    """A ``flwr-serverapp`` in ``folder`` that runs ``main`` with this interpreter; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / COMMAND
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom fedmm.deploy.flower.serverapp import main\n"
                      "sys.exit(main())\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def main() -> int:
    from flwr.superlink.cli import flwr_serverapp

    from . import internals_usable

    if internals_usable():
        poll_replies_often()
    return run_entry_point(sys.argv[0], flwr_serverapp, sys.argv[1:])
