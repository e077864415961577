"""A long-lived ClientApp process for one SuperNode.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for every
message (``--isolation subprocess``): each train or evaluate message pays
the imports and rebuilds the model and the partition (docs/benchmarks-log.md
measures what that costs a round). With ``flower-supernode --isolation
process`` the SuperNode only queues tasks on its Runtime API and leaves
running them to an outside executor. This is that executor: one process per
SuperNode that acquires each ClientApp task and runs it in-process, with
Flower's own task protocol (``fedmm/deploy/flower/task.py``: pull input, run
the app, push the reply and the context, heartbeats). Imports, and the model and data the ClientApp caches
per run (``clients/app.py``), survive from one message to the next.

What changes against ``flwr-clientapp``: nothing the server can see. Context
state still lives on the SuperNode and is pushed back after every task; an
exception in the ClientApp becomes an error reply, as there. A new app
version (FAB hash) unloads the previous version's modules first. Runtime
dependency installation is not supported: the worker runs the environment it
was started in.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from fedmm.logs import quiet_root_logger

from .. import pacing
from .core_slots import core_slot
from .flower.task import Task, acquire_task, install_app, load_clientapp, runtime_client
from .wakeup import Wakeup

log = logging.getLogger("fedmm.worker")

# Polling for a task backs off from POLL_FIRST to POLL_IDLE, doubling after each empty poll, and starts
# again after a task: each poll is an HTTP request the SuperNode serves, CPU taken from the training beside
# it. The SuperNode itself waits up to 3 s between its pulls and wakes the worker when it stores a message,
# so the idle poll's length adds little to a task's pickup.
POLL_FIRST, POLL_IDLE = 0.1, 2.0

# Heavy imports a ClientApp of this project needs; loaded once, before the first task.
WARM_MODULES = ("torch", "open_clip", "peft", "opacus", "fedmm.model", "fedmm.train", "fedmm.evaluate")


class ClientAppWorker:
    """Acquire and run ClientApp tasks from one SuperNode's Runtime API, forever or until stopped."""

    def __init__(self, runtime_api_address: str, *, warm: bool = True, core_slots: Path | None = None,
                 task_ready: Wakeup | None = None, reply_pushed: Wakeup | None = None):
        self.address = runtime_api_address
        self.core_slots = core_slots  # shared with the machine's other workers: K ClientApp calls at a time
        self.stopped = threading.Event()
        # notified by the SuperNode when it has stored a message; this worker notifies reply_pushed after a task
        self.task_ready, self.reply_pushed = task_ready, reply_pushed
        self.tasks_run = 0
        # ClientApp seconds of the last task of each message type: the next one's expected length, by which
        # the machine's core slots go to the longest task first
        self.last_seconds: dict[str, float] = {}
        self._app_dir: Path | None = None
        self._fab_hash: str | None = None  # the app version loaded now, and its ClientApp
        self._app: Any = None
        # The Runtime API is the SuperNode's own loopback endpoint (same host or container); the SuperLink
        # connection is the one that uses TLS.
        self._client = runtime_client(runtime_api_address)
        if warm:
            for name in WARM_MODULES:
                importlib.import_module(name)
            # Opacus's import gives the root logger a handler: this process's lines would print twice
            quiet_root_logger()

    def serve(self, max_tasks: int | None = None) -> None:
        log.info("fedmm worker: serving ClientApp tasks of the SuperNode at %s", self.address)
        wait = POLL_FIRST
        while not self.stopped.is_set() and (max_tasks is None or self.tasks_run < max_tasks):
            try:
                token = acquire_task(self._client)
            except Exception as exc:  # the SuperNode restarting: keep polling
                log.debug("fedmm worker: AcquireTask failed: %s", exc)
                self.stopped.wait(1.0)
                continue
            if token is not None:
                self.run_task(token)
                self.tasks_run += 1
                if self.reply_pushed is not None:
                    self.reply_pushed.notify()
                wait = POLL_FIRST
            elif self.task_ready is not None and self.task_ready.wait(wait):
                wait = POLL_FIRST
            else:
                if self.task_ready is None:
                    self.stopped.wait(wait)
                wait = min(2 * wait, POLL_IDLE)
        self._client.close()

    def stop(self) -> None:
        self.stopped.set()
        if self.task_ready is not None and self.task_ready.write_fd is not None:
            self.task_ready.notify()  # end the wait in serve() now

    def run_task(self, token: str) -> None:
        """One ClientApp execution, as Flower's ``flwr-clientapp`` runs it, minus the exit."""
        message = None
        status, error = "?", None
        started = pulled = ran = time.perf_counter()
        waited = 0.0
        with Task(self.address, token) as task:
            reply = None
            try:
                message, context, fab_hash, fab_content = task.pull()
                if fab_hash != self._fab_hash:  # install and load once per app version, not per message
                    app_dir = install_app(fab_content)
                    self._app = load_clientapp(app_dir, self._app_dir)
                    self._app_dir, self._fab_hash = app_dir, fab_hash
                pulled = time.perf_counter()
                kind = message.metadata.message_type
                # a tier's delay (fedmm/pacing.py) gives the slot back while it only waits
                with core_slot(self.core_slots, self.last_seconds.get(kind, 0.0)) as slot, \
                        pacing.lend_during_waits(slot.released):
                    reply = self._app(message=message, context=context)
                waited = slot.waited
                ran = time.perf_counter()
                self.last_seconds[kind] = ran - pulled - waited
                task.ran()
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log.error("fedmm worker: the ClientApp raised", exc_info=ex)
                error = ex
            status = task.finish(reply, error)
        kind = message.metadata.message_type if message is not None else "?"
        log.info("fedmm worker: %s task in %.2f s (pull %.2f, core slot %.2f, ClientApp %.2f, push %.2f; %s)", kind,
                 time.perf_counter() - started, pulled - started, waited, max(ran - pulled - waited, 0),
                 time.perf_counter() - max(ran, pulled), status)
