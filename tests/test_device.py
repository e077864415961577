"""Where models compute (``device``): resolution on this machine, the refusals that name the key before any
client is contacted (on a site: a decline naming the node-config key), and batches that move to a device."""

from __future__ import annotations

import subprocess

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmm import cli
from fedmm.config import ConfigError, Settings
from fedmm.data import Batch
from fedmm.device import DeviceUnavailable, device_problem, node_device, resolve_device

CUDA = torch.cuda.is_available()


def test_device_specs_parse_and_resolve_to_what_this_machine_has():
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert device_problem(good) is None
    for bad in ("gpu", "cuda:", "cuda:x", "CPU ", "mps", ""):
        assert device_problem(bad) == "must be auto, cpu, cuda or cuda:N", bad
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    count = torch.cuda.device_count() if CUDA else 0
    with pytest.raises(DeviceUnavailable, match="'cuda:99'"):
        resolve_device("cuda:99")
    if not CUDA:
        with pytest.raises(DeviceUnavailable, match="torch sees no CUDA device"):
            resolve_device("cuda")
    else:
        assert resolve_device(f"cuda:{count - 1}").index == count - 1


def test_the_run_config_key_is_checked_and_a_site_names_the_key_it_used():
    with pytest.raises(ConfigError, match="run-config 'device' = 'tpu': must be auto, cpu, cuda or cuda:N"):
        Settings.from_run_config({"device": "tpu"})
    assert Settings.from_run_config({}).device == "auto"
    assert node_device({"device": "cpu"}, "cuda:7") == torch.device("cpu")  # the site's own hardware decides
    with pytest.raises(DeviceUnavailable, match="node config 'device' = 'cuda:7'"):
        node_device({"device": "cuda:7"}, "cpu")
    with pytest.raises(DeviceUnavailable, match="run-config 'device' = 'cuda:7'.*node config 'device'"):
        node_device({}, "cuda:7")


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA; with one, cuda:0 resolves")
def test_without_cuda_the_server_and_the_command_refuse_a_cuda_run_before_anything_starts(monkeypatch, capsys):
    from server.app import main

    class NoGrid:
        def __getattr__(self, name):
            raise AssertionError(f"the ServerApp used grid.{name} before checking the device")

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"device": "cuda"})
    with pytest.raises(ConfigError, match="run-config 'device' = 'cuda' on the server: .*no CUDA device"):
        main(NoGrid(), context)

    def no_process(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(subprocess, "run", no_process)
    assert cli.main(["run", "--run-config", "device='cuda:0'"]) == 2
    assert "run-config 'device' = 'cuda:0'" in capsys.readouterr().err
    assert cli.main(["run", "--gpus-per-client", "0.5"]) == 2
    assert "--gpus-per-client: torch sees no CUDA device" in capsys.readouterr().err
    assert cli.main(["run", "--gpus-per-client", "2"]) == 2
    assert "--gpus-per-client 2" in capsys.readouterr().err
    assert cli.main(["run", "--deployment", "--ray-address", "127.0.0.1:1"]) == 2
    assert "--ray-address is the simulation's" in capsys.readouterr().err
    assert cli.main(["run", "--deployment", "--gpus-per-client", "0.5"]) == 2  # device slots, but no GPU here
    assert "--gpus-per-client: torch sees no CUDA device" in capsys.readouterr().err


def test_co_located_sites_that_share_a_gpu_take_turns_on_it_through_device_slots(tmp_path, monkeypatch):
    """fedmm run --deployment --gpus-per-client F: 1/F ClientApp tasks on the GPU at once (the core slots' lock
    files, counted per GPU instead of per core), each SuperNode with the machine's cores shared among them."""
    import os

    from fedmm.deploy import local

    started = []
    monkeypatch.setattr(local, "start", lambda cmd, *a, **k: started.append(cmd))
    fed = local.LocalFederation(tmp_path, 6, gpus_per_client=0.25, tls=False, auth=False)
    assert fed.core_slots == 4 and fed.threads == max(1, (os.cpu_count() or 1) // 4)
    fed.start_supernode(0)
    cmd = started[0]
    folder = tmp_path / "device-slots"
    assert cmd[cmd.index("--device-slots") + 1] == str(folder)
    assert sorted(p.name for p in folder.glob("slot-*")) == [f"slot-{i}" for i in range(4)]
    assert local.LocalFederation(tmp_path / "cpu", 6, tls=False, auth=False).slot_kind == "core-slots"
    assert local.LocalFederation(tmp_path / "whole", 3, gpus_per_client=1.0).core_slots == 1  # one task at a time
    with pytest.raises(ValueError, match="gpus_per_client = 2"):
        local.LocalFederation(tmp_path / "bad", 3, gpus_per_client=2)


def test_a_supernode_makes_its_device_slots_and_refuses_slots_without_a_folder(tmp_path, monkeypatch):
    from fedmm.deploy import supernode

    seen = []
    monkeypatch.setattr(supernode, "run_supernode", lambda flower, port, threads, slots: seen.append(slots) or 0)
    assert cli.main(["supernode", "--device-slots", str(tmp_path / "gpu"), "--slots", "3", "--", "--insecure"]) == 0
    assert seen == [tmp_path / "gpu"] and len(list((tmp_path / "gpu").glob("slot-*"))) == 3
    assert cli.main(["supernode", "--slots", "3", "--", "--insecure"]) == 2


@pytest.mark.skipif(CUDA, reason="a site without CUDA declines; with one, it would train")
@pytest.mark.parametrize("node_config,named", [
    ({"device": "cuda"}, "node config 'device' = 'cuda'"),
    ({}, "run-config 'device' = 'cuda'"),
])
def test_a_site_without_the_device_declines_naming_the_key(base_settings, node_config, named, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import app as client_app

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    run_config = {**base_settings.to_run_config(), "device": "cpu" if node_config else "cuda"}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2, **node_config},
                      state=RecordDict(), run_config=run_config)
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 1})})
    reply = client_app(Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN), context)
    assert reply.has_error() and named in reply.error.reason, reply.error.reason


def test_a_batch_moves_to_a_device_once_and_keeps_a_manifests_files_on_the_cpu(tmp_path):
    batch = Batch(torch.randn(4, 3, 8, 8), torch.ones(4, 5, dtype=torch.long), torch.arange(4), torch.zeros(4, dtype=torch.long),
                  torch.zeros(4, dtype=torch.bool))
    assert batch.to(torch.device("cpu")) is batch  # nothing to move
    moved = batch.to(torch.device("meta"))  # a device other than the CPU, without one at hand
    assert all(t.device.type == "meta" for t in (moved.images, moved.tokens, moved.labels, moved.groups, moved.toxic))
    assert moved.to(torch.device("meta")).images is moved.images  # already there: not copied again

    from PIL import Image

    from fedmm.data.images import ImageFiles

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    files = Batch(ImageFiles([str(path)] * 2, 8, (0.5,) * 3, (0.5,) * 3), torch.ones(2, 5, dtype=torch.long),
                  torch.arange(2), torch.zeros(2, dtype=torch.long))
    kept = files.to(torch.device("meta"))
    assert isinstance(kept.images, ImageFiles) and kept.tokens.device.type == "meta"
    assert files.window(0, 2).images.shape == (2, 3, 8, 8)  # a window decodes, on the CPU
