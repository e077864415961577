"""A real deployment-engine federation on this machine's loopback interface.

``LocalFederation(home, nodes=3)`` starts what a consortium runs, as plain
processes: one SuperLink (TLS on, SuperNode authentication on,
state in ``<home>/superlink/state.db``) and one ``fedmm supernode`` per site
(its own key, ``partition-id``/``num-partitions`` node config, its own
FLWR_HOME). The SuperLink is ``fedmm superlink`` (Flower's, with message
payloads in memory; see fedmm/deploy/flower/link.py). Node keys are registered with ``flwr supernode register`` before
the nodes start. ``run(app, run_config)`` submits a job with ``flwr run`` and
streams its logs; leaving the context stops every process it started, by PID.
``--insecure`` happens only with ``tls=False``. Where Flower's internals are
not the ones fedmm was checked against (``fedmm/deploy/flower/``), ``fedmm
superlink`` and ``fedmm supernode`` run stock Flower, and so does this.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .. import protocol
from . import flwr_cli
from .core_slots import make_core_slots
from .credentials import make_credentials
from .processes import (Interrupted, federation_env, flower_bin, free_port, start, start_on_a_free_port, stop_under,
                        wait_for_port)


def format_node_config(values: dict) -> str:
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items())


class LocalFederation:
    """SuperLink + N SuperNodes on 127.0.0.1; a context manager that stops them all."""

    def __init__(self, home: Path, nodes: int, *, tls: bool = True, auth: bool = True,
                 node_config: dict | None = None, port: int | None = None, warm_clientapps: bool = True,
                 threads: int | None = None, sites: list[Path] | None = None, core_slots: int | None = None,
                 gpus_per_client: float = 0.0):
        if nodes < 1:
            raise ValueError(f"LocalFederation: nodes = {nodes}: need at least one SuperNode")
        self.home = home.resolve()
        self.nodes, self.tls, self.auth = nodes, tls, auth
        # False: Flower's stock SuperNode, a fresh ClientApp process per message (the benchmarks' baseline)
        self.warm_clientapps = warm_clientapps
        self.extra_node_config = node_config or {}
        if sites is not None and len(sites) != nodes:
            raise ValueError(f"LocalFederation: {len(sites)} site manifests for {nodes} SuperNodes")
        self.sites = sites  # node i's own manifest (node config 'dataset'), if the sites bring their data
        # As the simulation engine gives each client its CPUs: at most one ClientApp task per core at a time
        # (core slots, shared by this machine's SuperNodes), each with the cores shared out as torch threads.
        # Sites that share one GPU take turns on it the same way (device slots): 1 / gpus_per_client at once.
        if not 0 <= gpus_per_client <= 1:
            raise ValueError(f"LocalFederation: gpus_per_client = {gpus_per_client}: a share of one GPU, in [0, 1]")
        cores = os.cpu_count() or 1
        self.slot_kind = "device-slots" if gpus_per_client else "core-slots"
        per_resource = int(1 / gpus_per_client + 1e-9) if gpus_per_client else cores
        self.core_slots = core_slots or max(1, min(nodes, per_resource))
        self.threads = threads or max(1, cores // self.core_slots)
        self.requested_port = port  # None: a free one, changed if another process takes it first
        self.port = port or 0
        self.credentials = self.home / "credentials"
        self.link_home = self.home / "superlink"
        self.database = self.link_home / "state.db"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []

    # --- paths a user of the federation needs -------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def node_key(self, i: int) -> Path:
        return self.credentials / f"node-{i}"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    # --- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        try:
            if self.tls or self.auth:
                make_credentials(self.credentials, self.nodes, ["127.0.0.1", "localhost"])
            self.port = start_on_a_free_port(self.start_superlink, lambda: stop_under(self.link_home, self.superlink),
                                             self.requested_port)
            self.write_flower_config()
            for i in range(self.nodes):
                if self.auth:
                    self.register(self.node_key(i).with_suffix(".pub"))
                self.start_supernode(i)
            self.wait_for_nodes(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.stop(force=exc_type is not None and issubclass(exc_type, (Interrupted, KeyboardInterrupt)))

    def stop(self, force: bool = False) -> None:
        stop_under(self.home, self.superlink, *self.supernodes, force=force)
        self.superlink, self.supernodes = None, []

    def write_flower_config(self) -> None:
        """``flwr`` CLI connection to this SuperLink (in the SuperLink's FLWR_HOME)."""
        flwr_cli.write_connection(self.link_home, self.address, self.credentials / "ca.crt" if self.tls else None)

    def start_superlink(self, port: int | None = None) -> None:
        """``fedmm superlink`` on ``port`` (default: the federation's), once it listens."""
        self.port = port or self.port
        cmd = [flower_bin("fedmm"), "superlink", "--", "--host", "127.0.0.1", "--port", str(self.port),
               "--isolation", "subprocess", "--database", str(self.database),
               "--disable-runtime-dependency-installation"]
        if self.tls:
            c = self.credentials
            cmd += ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
                    "--ssl-keyfile", str(c / "server.key")]
        else:
            cmd.append("--insecure")
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self.superlink = start(cmd, self.link_home, self.log_file("superlink"))
        wait_for_port(self.port, self.superlink, "flower-superlink", self.log_file("superlink"))

    def restart_superlink(self) -> None:
        """Stop the SuperLink (and the ServerApps it runs) and start it again on the same state file."""
        stop_under(self.link_home, self.superlink)
        self.start_superlink()

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI call against this SuperLink."""
        return flwr_cli.flwr(federation_env(self.link_home), *args, check=check)

    def register(self, public_key: Path) -> None:
        flwr_cli.register(federation_env(self.link_home), public_key)

    def node_args(self, i: int, key: Path | None = None) -> list[str]:
        """The ``fedmm supernode`` options of site ``i`` (``key`` overrides its registered key)."""
        config = {protocol.NODE_PARTITION_ID: i, protocol.NODE_NUM_PARTITIONS: self.nodes, **self.extra_node_config}
        if self.sites is not None:
            config[protocol.NODE_DATASET] = str(self.sites[i])
        args = ["--superlink", self.address, "--node-config", format_node_config(config)]
        args += ["--root-certificates", str(self.credentials / "ca.crt")] if self.tls else ["--insecure"]
        if self.auth:
            args += ["--auth-supernode-private-key", str(key or self.node_key(i))]
        return args

    def start_supernode(self, i: int, key: Path | None = None, name: str | None = None) -> subprocess.Popen:
        name = name or f"supernode-{i}"
        if self.warm_clientapps:
            cmd = [flower_bin("fedmm"), "supernode", "--runtime-port", str(free_port()), "--threads", str(self.threads),
                   f"--{self.slot_kind}", str(make_core_slots(self.home / self.slot_kind, self.core_slots)),
                   "--", *self.node_args(i, key)]
        else:
            cmd = [flower_bin("flower-supernode"), *self.node_args(i, key), "--isolation", "subprocess",
                   "--host", "127.0.0.1", "--port", str(free_port())]
        proc = start(cmd, self.home / "nodes" / name, self.log_file(name))
        self.supernodes.append(proc)
        return proc

    def online_nodes(self) -> int:
        return flwr_cli.online_nodes(federation_env(self.link_home))

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.online_nodes() < count:
            for i, proc in enumerate(self.supernodes):
                if proc.poll() is not None:
                    raise RuntimeError(f"supernode {i} exited (code {proc.returncode}); see {self.log_file(f'supernode-{i}')}")
            if time.time() > deadline:
                raise RuntimeError(f"{count} SuperNodes did not come online in {timeout:.0f} s; see {self.home / 'logs'}")
            time.sleep(1)

    def run(self, app: Path, run_config: str, *, stream: bool = True, timeout: float | None = None) -> int:
        """``flwr run <app>`` on this federation, waiting for the end; returns flwr's exit code."""
        return flwr_cli.flwr_run(self.link_home, app, run_config, log_file=None if stream else self.log_file("run"),
                                 timeout=timeout)
