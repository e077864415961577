"""Wake-up pipes: one process cuts another's wait short, across ``fork``/``exec``.

A ``fedmm supernode`` is two processes that would otherwise find each
other's work by polling: Flower's SuperNode (``fedmm/deploy/flower/node.py``)
and its ClientApp worker (``fedmm/deploy/clientapp_worker.py``). Two pipes
join them: the SuperNode wakes the worker as soon as it has stored a
message, and the worker wakes the SuperNode as soon as it has pushed the
reply. The polls stay, as the fallback.
"""

from __future__ import annotations

import os
import select


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
