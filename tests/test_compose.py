"""The docker compose rehearsal, end to end: a real federated job through containers.

Starts a local Docker engine with ../shared/tools/local-docker.sh (images are
built locally; nothing is pulled), builds the project's image, runs the
compose file's ``job`` (SuperLink with TLS and node authentication, three
SuperNodes each on its own site folder, 2 rounds of the tiny model) and
checks the report it wrote. The
federation is taken down afterwards, and the engine too if this test started
it, also when the test fails. Deselect with ``-m "not docker"`` on a machine
without root or Docker.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_DOCKER = ROOT.parent / "shared" / "tools" / "local-docker.sh"
PROJECT = "fedmm-compose-test"
pytestmark = pytest.mark.docker


def _engine_env() -> dict[str, str]:
    out = subprocess.run(["bash", str(LOCAL_DOCKER), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


@pytest.fixture(scope="module")
def docker_env():
    assert LOCAL_DOCKER.is_file(), f"{LOCAL_DOCKER} is missing: the compose test needs the local Docker engine script"
    env = _engine_env()
    already_up = subprocess.run(["docker", "info"], env=env, capture_output=True).returncode == 0
    try:
        subprocess.run(["bash", str(LOCAL_DOCKER), "up"], check=True, capture_output=True, timeout=3600)
        yield env
    finally:
        if not already_up:
            subprocess.run(["bash", str(LOCAL_DOCKER), "down"], capture_output=True, timeout=300)


def _compose_job(docker_env, base_settings, tmp_path, *override: str) -> tuple[subprocess.CompletedProcess, str]:
    """``docker compose run job`` with the compose file (and ``override`` files), then down; the job and the logs."""
    from fedmm.pretrain import ensure_base_checkpoint

    ensure_base_checkpoint(base_settings, progress=False)  # the session's base: `prepare` finds it cached
    env = {
        **docker_env,
        "FEDMM_CACHE": base_settings.cache_dir,
        "FEDMM_CREDENTIALS": str(tmp_path / "credentials"),
        "FEDMM_RUNS": str(tmp_path / "runs"),
        "FEDMM_SITES": str(tmp_path / "sites"),
        # secure aggregation by run config alone: the sites' updates reach the coordinator only masked
        "FEDMM_RUN_CONFIG": "model='fedmm-tiny-vit' pretrain-steps=400 num-server-rounds=2 local-steps=6 "
                            "secure-aggregation=true",
    }
    compose = [*_compose(*override)]
    try:
        job = subprocess.run([*compose, "run", "--build", "--rm", "job"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=2400)
        logs = subprocess.run([*compose, "logs", "--no-color"], env=env, cwd=ROOT, capture_output=True, text=True).stdout
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:] + logs[-3000:]
    return job, logs


def _compose(*override: str) -> list[str]:
    files = ["-f", str(ROOT / "docker-compose.yml")]
    for name in override:
        files += ["-f", str(ROOT / name)]
    return ["docker", "compose", "-p", PROJECT, *files]


def test_the_gpu_profile_gives_each_site_the_gpu_and_one_shared_folder_of_device_slots(docker_env):
    """docker-compose.gpu.yml over the rehearsal: every SuperNode reserves the GPU through the nvidia driver,
    computes on it (node config 'device') and takes its turn through the device slots all three share; their
    own site folder and key stay mounted."""
    merged = subprocess.run([*_compose("docker-compose.gpu.yml"), "config", "--format", "json"], env=docker_env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    services = json.loads(merged.stdout)["services"]
    for i in range(3):
        node = services[f"supernode-{i}"]
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        command = " ".join(node["command"])
        assert "--device-slots /slots --slots 2" in command and "device='cuda'" in command
        assert f"partition-id={i}" in command and f"/credentials/node-{i}" in command
        mounts = {v["target"]: v for v in node["volumes"]}
        assert mounts["/slots"]["source"].endswith("device-slots") and mounts["/data"]["read_only"]
    assert "deploy" in services["superlink"]  # central evaluation on the GPU too (run-config 'device' = auto)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the GPU profile runs where a GPU is")
def test_compose_runs_a_federated_job_on_the_gpu(docker_env, base_settings, tmp_path):
    _job, logs = _compose_job(docker_env, base_settings, tmp_path, "docker-compose.gpu.yml")
    reports = list((tmp_path / "runs").glob("compose-*/metrics.json"))
    assert len(reports) == 1
    rounds = {int(k): v for k, v in json.loads(reports[0].read_text())["rounds"].items()}
    assert rounds[2]["train/num-replies"] == 3, logs[-3000:]


def test_compose_runs_a_federated_job(docker_env, base_settings, tmp_path):
    job, logs = _compose_job(docker_env, base_settings, tmp_path)

    reports = list((tmp_path / "runs").glob("compose-*/metrics.json"))
    assert len(reports) == 1, job.stdout[-2000:]
    rounds = {int(k): v for k, v in json.loads(reports[0].read_text())["rounds"].items()}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[2]["train/num-replies"] == 3 and rounds[2]["evaluate/num-replies"] == 3
    assert rounds[1]["secagg/contributors"] == rounds[2]["secagg/contributors"] == 3
    # each SuperNode trained and tested on its own mounted site folder (exported by the `sites` service)
    clients = json.loads(reports[0].read_text())["clients"]
    for i in range(3):
        rows = len((tmp_path / "sites" / f"site-{i}" / "manifest.jsonl").read_text().splitlines())
        seen = {c["phase"]: c["num-examples"] for c in clients if c["round"] == 1 and c["partition-id"] == i}
        assert seen["train"] + seen["evaluate"] == rows, (i, seen, rows)
    assert "fedmm: report folder /runs/compose-" in job.stdout
    # node authentication was on: the three keys were registered before the nodes joined,
    # over TLS to a certificate issued for the service name
    assert sum("fedmm: SuperNode key /credentials/node-" in line for line in logs.splitlines()) == 3, logs[-3000:]
    from fedmm.deploy.credentials import certificate_hosts

    assert "superlink" in certificate_hosts(tmp_path / "credentials" / "server.crt")
    # each SuperNode ran all its ClientApp tasks in its one warm worker: per round train, evaluate and the three
    # secure-aggregation stages
    for i in range(3):
        node_logs = [line for line in logs.splitlines() if line.startswith(f"supernode-{i}")]
        assert sum("fedmm worker: " in l and "completed" in l for l in node_logs) == 10, "\n".join(node_logs[-20:])
