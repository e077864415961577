"""A simulation that joins an existing Ray cluster (``fedmm run --ray-address``) instead of starting its own:
against a Ray head this test starts on 127.0.0.1 (and stops by its FLWR_HOME marker, never by name)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from fedmm.deploy.processes import flower_bin, free_port, start, stop_under, wait_for_port
from fedmm.deploy.simulation import run_simulation
from fedmm.pretrain import ensure_base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_a_simulation_runs_on_a_ray_cluster_it_joins_by_address(base_settings, tmp_path):
    ensure_base_checkpoint(base_settings, progress=False)
    machine_wide = Path("/tmp/ray/ray_current_cluster")  # what a plain `ray start` would leave for every driver
    before = machine_wide.read_text() if machine_wide.is_file() else None
    head_home, port = tmp_path / "ray-head", free_port()
    log = tmp_path / "ray-head.log"
    # the head's own temp folder (short: Ray's socket paths must fit 107 characters): its sessions, where
    # every driver that joins it leaves a log, and the "current cluster" file `ray start` writes, which
    # must not be the machine's /tmp/ray (every other Ray driver here would find it)
    sessions = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    head = start([flower_bin("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                  "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                  "--disable-usage-stats", "--temp-dir", str(sessions)], head_home, log,
                 {"RAY_TMPDIR": str(sessions)})
    try:
        wait_for_port(port, head, "ray head", log, timeout=120)
        out, home = tmp_path / "report", tmp_path / "flwr"
        job = {**base_settings.to_run_config(), "num-server-rounds": 1, "local-steps": 2, "partitioner": "iid",
               "min-nodes": 2, "output-dir": str(out)}
        code = run_simulation(ROOT, job, num_supernodes=2, flwr_home=home, stream=False, timeout=600,
                              ray_address=f"127.0.0.1:{port}")
        assert code == 0 and (out / "summary.md").is_file(), (home / "run.log").read_text()[-3000:]
        # the simulation's driver joined this cluster: its log is in the head's session folder, not a new one
        assert list(sessions.glob("session_*/logs/python-core-driver-*.log")), sorted(sessions.rglob("*.log"))
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert rounds["1"]["train/num-replies"] == 2
        assert (machine_wide.read_text() if machine_wide.is_file() else None) == before
    finally:
        stop_under(head_home, head)
        shutil.rmtree(sessions, ignore_errors=True)
