"""Starting and stopping the Flower processes fedmm runs (simulation or deployment).

Every process gets a private ``FLWR_HOME`` below one folder per federation;
stopping looks for that marker in the process environment, because the
SuperLink detaches its SuperExec into a new session and Ray's workers hang
below that, so neither a PID list nor a process group would catch them all.
Nothing is ever stopped by name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower (or fedmm) executable of the environment fedmm runs from."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def federation_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no installs, loopback-only Ray, offline hubs."""
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
    return env


def start(cmd: list[str], flwr_home: Path, log_file: Path) -> subprocess.Popen:
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=federation_env(flwr_home),
                                stdin=subprocess.DEVNULL)


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log_file: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early (code {proc.returncode}); see {log_file}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} in {timeout:.0f} s; see {log_file}")


def processes_under(folder: Path) -> list[psutil.Process]:
    """Every live process whose FLWR_HOME is ``folder`` or below it."""
    root = str(folder)
    mine = []
    for proc in psutil.process_iter():
        try:
            home = proc.environ().get("FLWR_HOME", "")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if home == root or home.startswith(root + os.sep):
            mine.append(proc)
    return mine


def stop_processes(procs: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is left after 10 s."""
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def stop_under(folder: Path, *started: subprocess.Popen | None) -> None:
    """Stop everything started with a FLWR_HOME at or below ``folder``, then reap ``started``."""
    for _ in range(3):
        procs = processes_under(folder)
        if not procs:
            break
        stop_processes(procs)
    for proc in started:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
