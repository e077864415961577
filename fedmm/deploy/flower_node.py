"""``python -m fedmm.deploy.flower_node [--wake-fds R,W] <flower-supernode options>``: Flower's SuperNode,
idle poll shortened.

What ``fedmm supernode`` starts beside its ClientApp worker: Flower's own
``flower-supernode`` entry point with every option passed through, after
``fedmm.deploy.polling.shorten_idle_poll`` (0.5 s between empty message pulls
instead of 3 s). With ``--wake-fds R,W`` (two inherited pipe ends) the worker
cuts the SuperNode's wait for a reply short through R, and the SuperNode wakes
the worker through W once a message is stored.
"""

from __future__ import annotations

import sys

from .polling import Wakeup, shorten_idle_poll

WAKE_FDS = "--wake-fds"


def main(argv: list[str]) -> int:
    from flwr.supernode.cli import flower_supernode

    if argv[:1] == [WAKE_FDS]:
        read_fd, write_fd = (int(fd) for fd in argv[1].split(","))
        argv = argv[2:]
        shorten_idle_poll(reply_pushed=Wakeup(read_fd=read_fd), message_stored=Wakeup(write_fd=write_fd))
    else:
        shorten_idle_poll()
    sys.argv = ["flower-supernode", *argv]
    try:
        flower_supernode()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
