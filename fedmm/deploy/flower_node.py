"""``python -m fedmm.deploy.flower_node <flower-supernode options>``: Flower's SuperNode, idle poll shortened.

What ``fedmm supernode`` starts beside its ClientApp worker: Flower's own
``flower-supernode`` entry point with every option passed through, after
``fedmm.deploy.polling.shorten_idle_poll`` (0.5 s between empty message pulls
instead of 3 s).
"""

from __future__ import annotations

import sys

from .polling import shorten_idle_poll


def main(argv: list[str]) -> int:
    from flwr.supernode.cli import flower_supernode

    shorten_idle_poll()
    sys.argv = ["flower-supernode", *argv]
    try:
        flower_supernode()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
