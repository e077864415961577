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


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers share two cores: one torch thread each, here and in the federation processes a
        # worker starts (its ServerApp), or OpenMP threads spin-wait on each other's cores.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the longest tests first (the Docker rehearsal, then the federations), each file's tests
    kept together: xdist hands whole files to the two workers in this order, so no long file starts last
    on one worker while the other idles."""

    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("docker") else 1 if item.get_closest_marker("integration") else 2

    file_rank: dict[object, int] = {}
    for item in items:
        file_rank[item.path] = min(file_rank.get(item.path, 2), rank(item))
    items.sort(key=lambda item: file_rank[item.path])


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
    # the tiny from-scratch model keeps the suite fast; tests/test_towers.py covers the default model
    return Settings.from_run_config(
        {"model": "fedmm-tiny-vit", "cache-dir": cache_dir, "pretrain-steps": TEST_PRETRAIN_STEPS}
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
