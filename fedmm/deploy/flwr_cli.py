"""The ``flwr`` CLI as fedmm's launchers call it: one connection, ``flwr run``, node keys, node lists.

Every launcher (``fedmm run`` in simulation or deployment, ``fedmm submit``
against a SuperLink elsewhere) gives its Flower processes a private
``FLWR_HOME`` whose ``config.toml`` holds one connection, ``CONNECTION``:
TLS with a CA certificate, or ``insecure`` only when asked. ``flwr_run``
stages the app (``fedmm/deploy/flower/app_files.py``) and runs it with
``--stream``, which also makes ``flwr`` wait for the run to finish.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

from .flower.app_files import stage_app
from .processes import federation_env, flower_bin

CONNECTION = "fedmm"
log = logging.getLogger("fedmm")


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    """A Flower CLI ``config.toml`` whose default connection is ``CONNECTION`` at ``address``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{root_certificates.resolve()}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}\n'
    )


def flwr_run(flwr_home: Path, app_dir: Path, run_config: str, *, federation_config: str | None = None,
             log_file: Path | None = None, timeout: float | None = None) -> int:
    """``flwr run <app> --stream`` on ``flwr_home``'s connection; returns flwr's exit code.

    Its output goes to the console, or to ``log_file``.
    """
    cmd = [flower_bin("flwr"), "run", str(stage_app(app_dir, flwr_home / "app")), CONNECTION, "--stream",
           "--run-config", run_config]
    if federation_config is not None:
        cmd += ["--federation-config", federation_config]
    env = federation_env(flwr_home)
    if log_file is None:
        return subprocess.run(cmd, env=env, timeout=timeout).returncode
    with open(log_file, "w") as out:
        return subprocess.run(cmd, env=env, timeout=timeout, stdout=out, stderr=out).returncode


def flwr(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([flower_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def register(env: dict[str, str], public_key: Path) -> None:
    """Register a SuperNode key; one the SuperLink already knows is left as is."""
    proc = flwr(env, "supernode", "register", str(public_key), CONNECTION, "--format", "json", check=False)
    if proc.returncode != 0 and "already" not in (proc.stdout + proc.stderr).lower():
        raise RuntimeError(f"registering {public_key} failed:\n{proc.stdout}\n{proc.stderr}")


def online_nodes(env: dict[str, str]) -> int:
    nodes = _json(flwr(env, "supernode", "list", CONNECTION, "--format", "json").stdout).get("nodes", [])
    return sum(str(n.get("status", "")).lower() == "online" for n in nodes)


def wait_for_nodes(env: dict[str, str], count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while (n := online_nodes(env)) < count:
        if time.time() > deadline:
            raise RuntimeError(f"only {n} of {count} SuperNodes online after {timeout:.0f} s")
        time.sleep(1)


def wait_for_superlink(env: dict[str, str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while flwr(env, "ls", CONNECTION, "--format", "json", check=False).returncode != 0:
        if time.time() > deadline:
            raise RuntimeError(f"the SuperLink did not answer in {timeout:.0f} s")
        time.sleep(1)


def submit(flwr_home: Path, superlink: str, root_certificates: Path | None, app_dir: Path, run_config: str | None,
           *, register_keys: list[Path], wait_nodes: int) -> int:
    """``fedmm submit``: register ``register_keys`` at ``superlink``, then (``run_config`` not None) wait for
    ``wait_nodes`` SuperNodes and run the app; returns flwr's exit code (0 when only registering)."""
    write_connection(flwr_home, superlink, root_certificates)
    env = federation_env(flwr_home)
    wait_for_superlink(env)
    for key in register_keys:
        register(env, key)
        log.info("fedmm: SuperNode key %s registered", key)
    if run_config is None:
        return 0
    log.info("fedmm: waiting for %d SuperNodes at %s", wait_nodes, superlink)
    wait_for_nodes(env, wait_nodes)
    return flwr_run(flwr_home, app_dir, run_config)
