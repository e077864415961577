"""``fedmm supernode``: what a site runs: a Flower SuperNode plus its long-lived ClientApp worker.

The SuperNode is Flower's own ``flower-supernode`` with every connection
option the user gives (``--superlink``, ``--root-certificates``,
``--auth-supernode-private-key``, ``--node-config``, ``--insecure`` only if
asked), run with ``--isolation process`` and its Runtime API on a loopback
port, its idle message poll backing off from 0.5 s to Flower's 3 s
(``fedmm/deploy/flower/node.py``); this process then runs ``ClientAppWorker`` against that port, so
ClientApp tasks execute in one warm process instead of a fresh one per
message. Two ``Wakeup`` pipes tell each side at once that the other has work
for it (a message stored; a reply pushed). Either side ending ends the other;
SIGTERM/SIGINT stop both.

Where Flower's internals are not the ones fedmm was checked against
(``fedmm/deploy/flower/``), this process becomes stock ``flower-supernode``
with a ``flwr-clientapp`` process per message (``--threads`` still caps each
one's threads; core slots do not apply).

The worker runs at a lower CPU priority (``WORKER_NICENESS``) than the
SuperNode: training may take every core, but the SuperNode's heartbeats and
message transfers (and, when sites share a machine, the SuperLink's) must not
wait behind it.

The worker also keeps the memory a training step frees (``keep_freed_memory``)
instead of handing it back to the OS after every step and faulting it in
again on the next one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .clientapp_worker import ClientAppWorker
from .flower import internals_usable
from .flower.node import WAKE_FDS
from .processes import flower_bin
from .wakeup import Wakeup

log = logging.getLogger("fedmm.supernode")

# Options fedmm sets itself: the worker needs the Runtime API on loopback, in process isolation.
_OWNED = ("--isolation", "--host", "--port")
WORKER_NICENESS = 5
# glibc's mallopt parameters (malloc.h) and the values the worker sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # the ceiling of glibc's own adaptive threshold, from the first allocation on
TRIM_THRESHOLD = 256 * 2**20  # free memory the heap may hold at its top: more than one training step frees


def keep_freed_memory() -> bool:
    """Let this process's heap keep what it frees, up to ``TRIM_THRESHOLD``; False where the C library says no.

    glibc returns the top of the heap to the OS whenever more than ~2x its
    mmap threshold is free there, and a LoRA step frees far more than that
    (its activations): a process training the default model gave its pages
    back after every step and faulted them in again on the next, time spent
    in the kernel that Ray's actors in the simulation mostly did not pay
    (benchmarks/worker_memory.py; the figures are in docs/benchmarks-log.md).
    A heap that keeps them holds about the step's own peak, which the process
    reaches on every step anyway: ~90 MiB more per worker in a rehearsal.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def run_supernode(flower_args: list[str], runtime_port: int, threads: int | None = None,
                  core_slots: Path | None = None) -> int:
    """Run ``flower-supernode <flower_args>`` with a ClientAppWorker until either exits.

    ``threads`` caps torch's intra-op threads and ``core_slots`` (fedmm/deploy/core_slots.py) how many
    ClientApp calls run at once, for several SuperNodes sharing one machine.
    """
    for arg in flower_args:
        if arg.split("=")[0] in _OWNED:
            raise ValueError(f"fedmm supernode: {arg.split('=')[0]} is set by fedmm (process isolation, "
                             "Runtime API on 127.0.0.1); use --runtime-port to choose the port")
    if not internals_usable():
        return _stock_supernode(flower_args, runtime_port, threads)
    reply_read, reply_write = os.pipe()  # worker -> node: a reply is pushed
    task_read, task_write = os.pipe()  # node -> worker: a message is stored
    node_ends = (reply_read, task_write)
    cmd = [sys.executable, "-m", "fedmm.deploy.flower.node", WAKE_FDS, ",".join(map(str, node_ends)), *flower_args,
           "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port)]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
    node = subprocess.Popen(cmd, pass_fds=node_ends)
    os.close(reply_read)  # the node's end; this process keeps task_write as well, for stop()
    os.nice(WORKER_NICENESS)  # this process only; the SuperNode started above keeps its priority
    if not keep_freed_memory():
        log.info("fedmm supernode: the C library took no malloc thresholds; it returns freed memory as it decides")
    worker = ClientAppWorker(f"127.0.0.1:{runtime_port}", core_slots=core_slots,
                             task_ready=Wakeup(read_fd=task_read, write_fd=task_write),
                             reply_pushed=Wakeup(write_fd=reply_write))
    if threads:
        import torch

        torch.set_num_threads(threads)

    def watch_node() -> None:
        node.wait()
        worker.stop()

    threading.Thread(target=watch_node, daemon=True).start()
    asked_to_stop = threading.Event()

    def on_signal(*_: object) -> None:
        asked_to_stop.set()
        worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        worker.serve()
    finally:
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    log.info("fedmm supernode: %d ClientApp tasks run; flower-supernode exited with %s", worker.tasks_run, node.returncode)
    return 0 if asked_to_stop.is_set() else (node.returncode or 0)


def _stock_supernode(flower_args: list[str], runtime_port: int, threads: int | None) -> int:
    """Become Flower's own SuperNode, a ``flwr-clientapp`` process per message (never returns)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in each ClientApp process
    cmd = [flower_bin("flower-supernode"), *flower_args, "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(runtime_port)]
    log.warning("fedmm supernode: running %s", " ".join(cmd))
    os.execv(cmd[0], cmd)
