"""``fedmm submit``: the coordinator's side of a deployment, against any SuperLink.

Registers SuperNode public keys (``flwr supernode register``; a key already
registered is fine), waits until enough SuperNodes are online, runs the job
with ``flwr run --stream`` and prints where the report is. The connection is
a Flower CLI connection written to this process's ``FLWR_HOME``: TLS with the
given CA certificate, or ``--insecure`` only when asked.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from .processes import flower_bin

CONNECTION = "fedmm"


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """A Flower CLI ``config.toml`` whose default connection is ``name`` at ``address``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{root_certificates.resolve()}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}\n'
    )


def flwr(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([flower_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def register(env: dict[str, str], connection: str, public_key: Path) -> None:
    """Register a SuperNode key; one the SuperLink already knows is left as is."""
    proc = flwr(env, "supernode", "register", str(public_key), connection, "--format", "json", check=False)
    if proc.returncode != 0 and "already" not in (proc.stdout + proc.stderr).lower():
        raise RuntimeError(f"registering {public_key} failed:\n{proc.stdout}\n{proc.stderr}")


def online_nodes(env: dict[str, str], connection: str) -> int:
    nodes = _json(flwr(env, "supernode", "list", connection, "--format", "json").stdout).get("nodes", [])
    return sum(str(n.get("status", "")).lower() == "online" for n in nodes)


def wait_for_nodes(env: dict[str, str], connection: str, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while (n := online_nodes(env, connection)) < count:
        if time.time() > deadline:
            raise RuntimeError(f"only {n} of {count} SuperNodes online after {timeout:.0f} s")
        time.sleep(1)


def wait_for_superlink(env: dict[str, str], connection: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while flwr(env, "ls", connection, "--format", "json", check=False).returncode != 0:
        if time.time() > deadline:
            raise RuntimeError(f"the SuperLink of connection {connection!r} did not answer in {timeout:.0f} s")
        time.sleep(1)
