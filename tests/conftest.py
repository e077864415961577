"""Shared fixtures: one small public-pretrained base per test session.

Every test that needs a base model uses ``base_settings``: its cache dir is a
session temp dir, so tests never touch the user's cache, and the base is
pretrained once (fewer steps than the default; enough to learn from). The
suite runs on two pytest-xdist workers (federations mostly wait on each
other's processes); both share one cache dir, and the base checkpoint's file
lock lets one of them build it while the other waits.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from fedmm import model as models
from fedmm.config import Settings
from fedmm.pretrain import load_base_model

TEST_PRETRAIN_STEPS = 400
# client-resources-num-cpus for a federation test that needs no concurrency: one Ray actor runs the clients
# in turn. A second actor's imports and client build cost ~16 s of CPU in a 2-round tiny run (96 s -> 80 s
# measured), and the suite's two workers keep both cores busy anyway.
ONE_ACTOR = 2


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers share two cores: one torch thread each, here and in the federation processes a
        # worker starts (its ServerApp), or OpenMP threads spin-wait on each other's cores.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


BASE_FIXTURES = {"base_settings", "base_model", "_base_model", "default_model_settings"}
# Seconds per federation file in a suite run (--durations, 2026-12-01): longest first, so that no long
# file starts last on one worker while the other idles. A file not listed counts as short.
FEDERATION_SECONDS = {
    "test_deployment.py": 360, "test_resume.py": 260, "test_integration.py": 230,
    "test_privacy_federation.py": 180, "test_default_model_federation.py": 170,
    "test_hetero_rank_federation.py": 140, "test_faults.py": 130, "test_strategy_plugin.py": 95,
    "test_qfedavg_federation.py": 90, "test_flower_seam.py": 120, "test_ray_cluster.py": 100,
    "test_async_federation.py": 80, "test_experiment.py": 150, "test_methods.py": 90,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order xdist hands whole files to the two workers: the Docker rehearsal, then the files that need
    no base model (they keep the second worker busy while the first pretrains the session's base; a base
    test would wait on its lock), then the federations longest first, then the rest, each file's tests
    kept together."""

    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("docker") else 2 if item.get_closest_marker("integration") else 3

    file_rank: dict[object, int] = {}
    needs_base: set[object] = set()
    for item in items:
        file_rank[item.path] = min(file_rank.get(item.path, 3), rank(item))
        if BASE_FIXTURES & set(item.fixturenames):
            needs_base.add(item.path)
    for path, r in file_rank.items():
        if r == 3 and path not in needs_base:
            file_rank[path] = 1
    items.sort(key=lambda item: (file_rank[item.path], -FEDERATION_SECONDS.get(item.path.name, 0)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, worker_id) -> str:
    if worker_id == "master":  # not under xdist
        return str(tmp_path_factory.mktemp("fedmm-cache"))
    # the workers' temp dirs share this session's parent dir
    shared = tmp_path_factory.getbasetemp().parent / "fedmm-cache"
    shared.mkdir(exist_ok=True)
    return str(shared)


@pytest.fixture(scope="session")
def base_settings(cache_dir) -> Settings:
    # the tiny from-scratch model keeps the suite fast; tests/test_towers.py covers the default model. The
    # device is given explicitly: every DP mode, codec and secure-aggregation path runs with device = 'cpu'
    return Settings.from_run_config(
        {"model": "fedmm-tiny-vit", "cache-dir": cache_dir, "pretrain-steps": TEST_PRETRAIN_STEPS, "device": "cpu"}
    )


@pytest.fixture(scope="session")
def default_model_settings(cache_dir) -> Settings:
    """The default effnet-lite0-minilm, its heads aligned in fewer steps (seconds); one base for every test."""
    return Settings.from_run_config({"cache-dir": cache_dir, "pretrain-steps": 300})


@pytest.fixture(scope="session")
def _base_model(base_settings) -> torch.nn.Module:
    return load_base_model(base_settings, progress=False)


@pytest.fixture
def base_model(_base_model) -> torch.nn.Module:
    """A fresh copy of the frozen public-pretrained base (tests may modify it)."""
    return copy.deepcopy(_base_model)


@pytest.fixture(scope="session")
def tokenizer(base_settings):
    return models.create_tokenizer(base_settings.model)


def honest_metrics(phase: str = "train", dp: str = "none", secure_aggregation: bool = False,
                   **values: float) -> dict[str, float]:
    """A stand-in reply's metrics: exactly the keys fedmm's ClientApp sends in a ``phase`` reply of a run
    under ``dp`` (the protocol's set, which the server's ReplyCheck expects), ``values`` set, the rest
    neutral."""
    from fedmm import protocol
    from fedmm.privacy.release import EVALUATE_ALWAYS, train_metric_keys

    keys = EVALUATE_ALWAYS if phase == "evaluate" else sorted(train_metric_keys(dp, secure_aggregation, False))
    base = {k: 0.0 for k in keys}
    base.update({protocol.NUM_EXAMPLES: 1, protocol.UNIT_WEIGHT: 1, protocol.PARTITION_ID: 0})
    if phase != "evaluate":
        base[protocol.LORA_RANK] = 1
    base.update(values)
    return base


@pytest.fixture
def sigints():
    """SIGINTs this process sends itself, recorded instead of acted on."""
    import signal

    seen: list[bool] = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append(True))
    yield seen
    signal.signal(signal.SIGINT, previous)
