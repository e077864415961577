"""``fedmm run`` without ``--deployment``: a simulation SuperLink on loopback, and the job run on it.

The simulation engine is stock Flower: ``flower-superlink --simulation``
runs the ServerApp and the ClientApps (Ray actors) itself; fedmm only picks
free loopback ports, gives every process it starts one private
``FLWR_HOME`` (so all of them, Ray's included, are stopped by that marker,
never by name) and submits the job with the ``flwr`` CLI (``flwr_cli.py``).

Clients reserve ``cpus_per_client`` CPUs and ``gpus_per_client`` of a GPU
each (Flower's ``client-resources-num-*``): 1/F clients share one GPU at
once. With ``ray_address`` the simulation joins that Ray cluster (Ray reads
``RAY_ADDRESS`` when it starts) instead of starting its own on this machine;
the cluster's processes are the cluster's, and stay when the run ends.
Without one it always starts its own (``RAY_ADDRESS=local``): Ray would
otherwise join the last cluster a ``ray start`` on this machine left in its
temp folder, silently, or hang when that cluster is gone.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import psutil

from ..config.text import format_run_config
from .flwr_cli import flwr_run, write_connection
from .processes import Interrupted, flower_bin, processes_under, start, start_on_a_free_port, stop_under, wait_for_port


class SimulationSuperLink:
    """A ``flower-superlink --simulation`` on a free loopback port; stopped by its FLWR_HOME."""

    def __init__(self, flwr_home: Path, log_file: Path, ray_address: str | None = None):
        self.flwr_home, self.log_file = flwr_home, log_file
        self.extra_env = {"RAY_ADDRESS": ray_address or "local"}
        self.port = 0  # Control, Fleet and Runtime APIs share one HTTP listener
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> SimulationSuperLink:
        try:
            self.port = start_on_a_free_port(self._start, self.stop)
        except RuntimeError:
            self.stop()
            raise
        write_connection(self.flwr_home, f"127.0.0.1:{self.port}", None)
        return self

    def _start(self, port: int) -> None:
        cmd = [flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:"]
        self.log_file.write_text("")
        self.proc = start(cmd, self.flwr_home, self.log_file, self.extra_env)
        wait_for_port(port, self.proc, "flower-superlink", self.log_file)

    def processes(self) -> list[psutil.Process]:
        """Every process this federation started (they all carry its FLWR_HOME)."""
        return processes_under(self.flwr_home)

    def stop(self, force: bool = False) -> None:
        if self.proc is not None:
            stop_under(self.flwr_home, self.proc, force=force)

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.stop(force=exc_type is not None and issubclass(exc_type, (Interrupted, KeyboardInterrupt)))


def run_simulation(
    app_dir: Path,
    run_config: dict,
    *,
    num_supernodes: int = 10,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    flwr_home: Path | None = None,
    stream: bool = True,
    timeout: float | None = None,
) -> int:
    """Run the Flower app at ``app_dir`` in the simulation engine; returns flwr's exit code.

    Logs go to the console (``stream``) or to ``<flwr_home>/run.log``.
    """
    home = flwr_home or Path(tempfile.mkdtemp(prefix="fedmm-flwr-"))
    home.mkdir(parents=True, exist_ok=True)
    with SimulationSuperLink(home, home / "superlink.log", ray_address):
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
        if gpus_per_client > 0:
            federation += f" client-resources-num-gpus={gpus_per_client}"
        return flwr_run(home, app_dir, format_run_config(run_config), federation_config=federation,
                        log_file=None if stream else home / "run.log", timeout=timeout)
