"""Flower's deployment engine on 127.0.0.1: a real SuperLink and SuperNode processes.

One federation (TLS and SuperNode authentication on, state in a file) runs a
short job, each SuperNode on its own site folder (``fedmm data export`` of
the run's partitions; node config ``dataset``), then is probed for what a
consortium relies on: each node read its own folder and nothing else, the
job's result matches the simulation of the same config (which slices the
bundled data instead), ClientApp tasks ran in one warm process per node, an
unregistered node is refused, plain HTTP is refused, and a restarted
SuperLink still knows the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import time
from pathlib import Path

import pytest

from fedmm.config.text import format_run_config
from fedmm.deploy.simulation import run_simulation
from fedmm.config import Settings
from fedmm.data.digits import CLASS_NAMES
from fedmm.data.sites import export_sites
from fedmm.deploy.credentials import certificate_hosts, make_node_key
from fedmm.deploy.flwr_cli import CONNECTION
from fedmm.deploy.local import LocalFederation
from fedmm.deploy.processes import processes_under
from fedmm.pretrain import ensure_base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
pytestmark = pytest.mark.integration


def _job(base_settings, out: Path) -> dict:
    return {**base_settings.to_run_config(), "num-server-rounds": 2, "local-steps": 6,
            "partitioner": "iid", "min-nodes": NODES, "output-dir": str(out),
            # the run's label space and group names: every site's labels and groups are these strings
            "classes": ",".join(CLASS_NAMES), "groups": "ink,paper"}


def _reads(folder: Path) -> dict[Path, float]:
    return {f: f.stat().st_atime for f in folder.rglob("*.png")}


def _rounds(out: Path) -> dict[int, dict]:
    return {int(k): v for k, v in json.loads((out / "metrics.json").read_text())["rounds"].items()}


@pytest.fixture(scope="module")
def federation(base_settings, tmp_path_factory):
    ensure_base_checkpoint(base_settings, progress=False)
    home = tmp_path_factory.mktemp("deployment")
    job = _job(base_settings, home / "report")
    # one folder per site, and a sibling no node is given (a copy of site 0's): nothing may open it
    sites = export_sites(Settings.from_run_config(job), home / "sites", NODES)
    shutil.copytree(home / "sites" / "site-0", home / "sites" / f"site-{NODES}")
    manifests = [home / "sites" / f"site-{i}" / "manifest.jsonl" for i in range(NODES)]
    for f in (home / "sites").rglob("*.png"):  # access times before the mtimes: the next read moves them (relatime)
        os.utime(f, ns=(f.stat().st_mtime_ns - 10**9, f.stat().st_mtime_ns))
    before = _reads(home / "sites")
    with LocalFederation(home, NODES, threads=1, sites=manifests) as fed:  # one torch thread per client
        code = fed.run(ROOT, format_run_config(job), stream=False, timeout=900)
        assert code == 0, (home / "logs" / "run.log").read_text()[-3000:]
        yield fed, home / "report", sites, before
    assert processes_under(home) == []  # every process it started is gone


def test_each_site_read_its_own_folder_and_nothing_else(federation):
    fed, out, sites, before = federation
    after = _reads(fed.home / "sites")
    clients = json.loads((out / "metrics.json").read_text())["clients"]
    for i in range(NODES + 1):
        files = [f for f in before if f"site-{i}" in f.parts]
        read = [f for f in files if after[f] > before[f]]
        if i == NODES:  # the sibling folder, given to no node, was never opened
            assert read == [], read[:3]
            continue
        # what node i reports it trained and tested on is its own folder's rows, and it decoded its images:
        # every held-out one (evaluation), and the training ones its minibatches drew
        rows = {c["phase"]: c["num-examples"] for c in clients if c["round"] == 1 and c["partition-id"] == i}
        assert rows["train"] + rows["evaluate"] == sites[f"site-{i}"] == len(files)
        assert len(read) >= rows["evaluate"] + 0.9 * rows["train"], (i, len(read), rows)
    # string labels and groups end to end: the site manifests hold names, the report shows the groups' names
    first = json.loads((fed.home / "sites" / "site-0" / "manifest.jsonl").read_text().splitlines()[0])
    assert first["label"] in CLASS_NAMES and first["group"] in ("ink", "paper")
    assert json.loads((out / "metrics.json").read_text())["extra"]["group-names"] == ["ink", "paper"]


def test_deployment_job_matches_simulation(federation, base_settings, tmp_path):
    fed, out, _, _ = federation
    deployed = _rounds(out)
    assert sorted(deployed) == [0, 1, 2]
    assert deployed[2]["train/num-replies"] == NODES and deployed[2]["evaluate/num-replies"] == NODES
    assert (out / "summary.md").is_file()

    sim_out = tmp_path / "sim"
    code = run_simulation(ROOT, _job(base_settings, sim_out), num_supernodes=NODES,
                          flwr_home=tmp_path / "flwr", stream=False, timeout=900)
    assert code == 0
    simulated = _rounds(sim_out)
    # same partitions, seed, global model and one torch thread per client (the simulation gives each client
    # one CPU): the engines agree bit for bit on everything but the machine's own measurements
    for r in (0, 1, 2):
        measured = {k: v for k, v in deployed[r].items() if "seconds" not in k and "rss" not in k}
        assert measured == {k: v for k, v in simulated[r].items() if "seconds" not in k and "rss" not in k}, r


def test_each_node_runs_its_tasks_in_one_warm_process(federation):
    fed, *_ = federation
    for i in range(NODES):
        log = fed.log_file(f"supernode-{i}").read_text()
        assert log.count("serving ClientApp tasks") == 1  # one worker process, started once
        done = re.findall(r"fedmm worker: (train|evaluate) task in [\d.]+ s .*completed", log)
        assert sorted(done) == ["evaluate", "evaluate", "train", "train"], log[-2000:]


def test_superlink_serves_tls_only(federation):
    fed, *_ = federation
    ca = fed.credentials / "ca.crt"
    assert set(certificate_hosts(fed.credentials / "server.crt")) >= {"127.0.0.1", "localhost"}
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # plain HTTP gets no HTTP answer
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(10)
        try:
            answer = raw.recv(100)
        except (ConnectionResetError, socket.timeout):
            answer = b""
        assert not answer.startswith(b"HTTP/")
    # and a client that does not trust our CA is refused
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_unregistered_node_is_refused(federation, tmp_path):
    fed, *_ = federation
    before = fed.online_nodes()
    rogue_key = make_node_key(tmp_path, "rogue")  # valid key pair, never registered
    proc = fed.start_supernode(0, key=rogue_key, name="rogue")
    proc.wait(timeout=120)
    assert proc.returncode != 0
    log = fed.log_file("rogue").read_text()
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert fed.online_nodes() == before


def test_restarted_superlink_keeps_its_runs(federation):
    fed, *_ = federation

    def runs() -> list[dict]:
        out = fed.flwr("ls", CONNECTION, "--format", "json").stdout
        return json.loads(out[out.index("{"):])["runs"]

    before = runs()
    assert len(before) == 1 and "finished" in before[0]["status"].lower()
    fed.restart_superlink()
    time.sleep(1)
    after = runs()
    assert [r["run-id"] for r in after] == [r["run-id"] for r in before]
    assert after[0]["status"] == before[0]["status"]


def test_secure_aggregation_on_the_deployment_engine(federation, base_settings, tmp_path):
    """Last, on the same TLS + node-auth federation (after the SuperLink's restart): a job under secure
    aggregation and distributed DP; every round sums all three sites' masked updates, through their warm
    workers and the state they keep between messages, and the Skellam ledger is charged per round."""
    fed, *_ = federation
    out = tmp_path / "report"
    job = {**_job(base_settings, out), "secure-aggregation": True, "dp": "distributed", "dp-noise-multiplier": 0.3,
           "local-steps": 2}
    code = fed.run(ROOT, format_run_config(job), stream=False, timeout=900)
    assert code == 0, (fed.home / "logs" / "run.log").read_text()[-3000:]
    rounds = _rounds(out)
    for r in (1, 2):
        assert rounds[r]["secagg/contributors"] == NODES and rounds[r]["secagg/dropped"] == 0, rounds[r]
    assert 0 < rounds[1]["privacy/epsilon"] < rounds[2]["privacy/epsilon"]
    privacy = json.loads((out / "metrics.json").read_text())["extra"]["privacy"]
    assert "SecAgg+" in privacy["secure-aggregation"] and "the server included" in privacy["guarantee"]
    assert "## Secure aggregation" in (out / "summary.md").read_text()


def test_asynchronous_aggregation_on_the_deployment_engine_and_its_resume(federation, base_settings, tmp_path):
    """The asynchronous loop on the deployment engine's Grid (TLS, node auth, warm workers): site 0 is a slow
    tier, the buffer of 2 fills from whoever is done, every reply applied once; interrupted after two
    aggregations and resumed to four, nothing of before the checkpoint is applied again, and the sites
    evaluate the final global."""
    fed, *_ = federation
    out = tmp_path / "report"
    job = {**_job(base_settings, out), "asynchronous": True, "buffer-size": 2, "num-server-rounds": 2,
           "local-steps": 2, "client-profiles": "slow: delay=3; fast:", "partition-profiles": "slow,fast,fast"}
    code = fed.run(ROOT, format_run_config(job), stream=False, timeout=900)
    assert code == 0, (fed.home / "logs" / "run.log").read_text()[-3000:]
    first = [c for c in json.loads((out / "metrics.json").read_text())["clients"] if c["phase"] == "train"]
    code = fed.run(ROOT, format_run_config({**job, "num-server-rounds": 4, "resume": True}), stream=False,
                   timeout=900)
    assert code == 0, (fed.home / "logs" / "run.log").read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = _rounds(out)
    assert all(rounds[r]["async/updates"] == 2 for r in (1, 2, 3, 4)) and rounds[4]["evaluate/num-replies"] == NODES
    train = [c for c in metrics["clients"] if c["phase"] == "train"]
    assert len(train) == 8 and all(c["staleness"] == c["round"] - 1 - c["trained-on-version"] for c in train)
    # what the first run applied is kept as it was; the resumed run applied only updates of its own versions
    assert [c for c in train if c["round"] <= 2] == first
    assert all(c["trained-on-version"] >= 2 for c in train if c["round"] > 2)
    assert sum(c["partition-id"] != 0 for c in train) >= 5  # the fast sites fill the buffer
