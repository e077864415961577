"""Starting and stopping the Flower processes fedmm runs (simulation or deployment).

Every process gets a private ``FLWR_HOME`` below one folder per federation;
stopping looks for that marker in the process environment, because the
SuperLink detaches its SuperExec into a new session and Ray's workers hang
below that, so neither a PID list nor a process group would catch them all.
Nothing is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

# how often a process whose free port was taken before it bound it is started again on a fresh one
PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower (or fedmm) executable of the environment fedmm runs from."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def federation_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no installs, loopback-only Ray, offline hubs (plus
    ``extra``, e.g. the address of a Ray cluster to join)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # Ray then uses 127.0.0.1 as its node address instead of a public interface.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def start(cmd: list[str], flwr_home: Path, log_file: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=federation_env(flwr_home, extra_env),
                                stdin=subprocess.DEVNULL)


class PortTaken(RuntimeError):
    """The port chosen for a process was taken by another one before it could bind it."""


def _listens(proc: subprocess.Popen, port: int) -> bool:
    """Whether ``proc`` itself (or a child of it) holds the listening socket on 127.0.0.1:``port``.

    A bare connect is not proof: between ``free_port`` releasing a port and the
    process binding it, anything else on the machine may take it (seen in CI:
    the SuperLink failed with "address already in use" while a connect to the
    port, answered by the other listener, said it was up).
    """
    try:
        root = psutil.Process(proc.pid)
        owners = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for owner in owners:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in owner.net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def start_on_a_free_port(start_at: Callable[[int], None], stop: Callable[[], None], port: int | None = None) -> int:
    """``start_at(port)`` (``start_at`` waits until its process listens); returns the port it listens on.

    With no ``port`` given it is a free one, and a fresh one again (after ``stop``) whenever another process
    took it between ``free_port`` and the bind (``PortTaken``), up to ``PORT_ATTEMPTS`` times.
    """
    chosen = port is None
    attempts = PORT_ATTEMPTS if chosen else 1
    for attempt in range(attempts):
        here = free_port() if chosen else port
        assert here is not None
        try:
            start_at(here)
            return here
        except PortTaken:
            stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log_file: Path, timeout: float = 60) -> None:
    """Wait until ``proc`` listens on ``port``; ``PortTaken`` if another process had it first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log = log_file.read_text(errors="replace") if log_file.is_file() else ""
            if "address already in use" in log.lower():
                raise PortTaken(f"{what}: port {port} was taken by another process; see {log_file}")
            raise RuntimeError(f"{what} exited early (code {proc.returncode}); see {log_file}")
        if _listens(proc, port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} in {timeout:.0f} s; see {log_file}")


def flwr_home_of(proc: psutil.Process) -> str:
    """The FLWR_HOME in a process's environment ('' if none or unreadable).

    On Linux the raw ``/proc/<pid>/environ`` is scanned: a process that rewrites
    its title over the start of that block (Ray's workers and agents) leaves
    empty entries there, at which psutil's parser stops.
    """
    try:
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
    except FileNotFoundError:  # not Linux, or the process is gone
        try:
            return proc.environ().get("FLWR_HOME", "")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            return ""
    except OSError:
        return ""
    for entry in raw.split(b"\0"):
        if entry.startswith(b"FLWR_HOME="):
            return entry[len(b"FLWR_HOME="):].decode(errors="replace")
    return ""


def processes_under(folder: Path) -> list[psutil.Process]:
    """Every live process whose FLWR_HOME is ``folder`` or below it, with its descendants."""
    root = str(folder)
    mine = []
    for proc in psutil.process_iter():
        home = flwr_home_of(proc)
        if home == root or home.startswith(root + os.sep):
            mine.append(proc)
    # and their descendants: Ray's agents overwrite their whole environment with their process title, so
    # only their parent (the raylet) still carries the marker; once it is gone they would be unreachable
    found = {p.pid: p for p in mine}
    for proc in mine:
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


class Interrupted(Exception):
    """The user stopped the command (SIGINT: Ctrl-C, or SIGTERM)."""


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread, whatever disposition the process inherited.

    A shell starts background jobs with SIGINT ignored, and SIGTERM's default
    ends the process without running any cleanup: either way the federation
    would go on without the command. The first signal raises; later ones
    are ignored, so the cleanup it triggers is not cut short.
    """
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if not received:
            received.append(signum)
            raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_processes(procs: list[psutil.Process], force: bool = False) -> None:
    """SIGTERM, then SIGKILL what is left after 10 s; ``force``: SIGKILL at once (nothing may finish its work)."""
    for p in procs:
        try:
            p.kill() if force else p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=2 if force else 10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def stop_under(folder: Path, *started: subprocess.Popen | None, force: bool = False) -> None:
    """Stop everything started with a FLWR_HOME at or below ``folder``, then reap ``started``.

    ``force`` (after an interrupt): SIGKILL at once, the ServerApp first, so no
    round completes after it; a checkpoint being written is either complete or
    ignored (its ``latest.json`` moves atomically).
    """
    # Ray's raylet restarts its agents when they die, possibly just before it dies itself: stop only once two
    # scans a second apart find nothing left (agents outliving a run were seen without the second scan).
    quiet = 0
    for _ in range(12):
        procs = processes_under(folder)
        if procs:
            quiet = 0
            stop_processes(procs, force)
            continue
        quiet += 1
        if quiet == 2:
            break
        time.sleep(1.0)
    for proc in started:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
