"""The seam (``fedmm/deploy/flower/``): what fedmm changes in Flower, checked against Flower's own code.

- every contract holds on the pinned Flower, and a broken one (or another version, or the switch) makes
  the whole seam fall back, saying so once;
- the behaviours fedmm overrides are still Flower's: its SuperNode loop sleeps right after an empty pull
  (the idle wait the back-off replaces), its HTTP retry and task heartbeat signal the process (what the
  warm worker must not do), its Grid's reply loop is the one fedmm speeds up;
- a deployment federation forced onto stock Flower runs a job to its report.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from fedmm.deploy import flower
from fedmm.deploy.flower import contract

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_seam(monkeypatch):
    """The seam's once-per-process check run again in this test (and forgotten after it)."""
    monkeypatch.delenv(flower.SEAM_ENV, raising=False)
    flower.internals_usable.cache_clear()
    yield
    flower.internals_usable.cache_clear()


class _Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_every_change_fedmm_makes_finds_what_it_expects_in_the_pinned_flower(fresh_seam):
    assert contract.broken_contracts() == []
    assert flower.internals_usable()


def test_a_broken_contract_another_version_or_the_switch_falls_back_to_stock_flower_and_says_so_once(
        fresh_seam, monkeypatch):
    from flwr.supernode import start_client_internal

    monkeypatch.delattr(start_client_internal, "_pull_and_store_message")
    broken = contract.broken_contracts()
    assert len(broken) == 1 and "SuperNode idle back-off" in broken[0] and "_pull_and_store_message" in broken[0]
    listener = _Said()
    flower.log.addHandler(listener)  # this logger's own: what the test sees does not depend on propagation
    try:
        assert not flower.internals_usable() and not flower.internals_usable()
    finally:
        flower.log.removeHandler(listener)
    said = listener.messages
    assert len(said) == 1 and "_pull_and_store_message" in said[0] and "flower-supernode" in said[0]
    monkeypatch.undo()

    monkeypatch.setattr(contract, "flower_version", lambda: "1.43.0")
    assert contract.broken_contracts() == ["Flower 1.43.0 is not a version these changes were checked against (1.42)"]
    monkeypatch.undo()

    flower.internals_usable.cache_clear()
    monkeypatch.setenv(flower.SEAM_ENV, "stock")
    assert not flower.internals_usable()
    flower.internals_usable.cache_clear()
    monkeypatch.setenv(flower.SEAM_ENV, "fast")
    with pytest.raises(ValueError, match=flower.SEAM_ENV):
        flower.internals_usable()


def test_without_the_seam_flwr_run_gets_the_app_folder_itself(fresh_seam, monkeypatch, tmp_path):
    from fedmm.deploy.flower.app_files import stage_app

    monkeypatch.setenv(flower.SEAM_ENV, "stock")
    assert stage_app(ROOT, tmp_path / "staged") == ROOT and not (tmp_path / "staged").exists()


def test_flowers_supernode_sleeps_once_right_after_a_pull_that_found_no_message():
    """The idle back-off replaces exactly that sleep, recognised by where it falls, not by its value."""
    from flwr.supernode import start_client_internal

    waits = contract.idle_waits(start_client_internal.start_client_internal)
    assert len(waits) == 1

    def a_loop_that_sleeps_elsewhere(_pull_and_store_message, time):
        while True:
            run_id = _pull_and_store_message()
            time.sleep(3)
            if run_id is None:
                continue

    assert contract.idle_waits(a_loop_that_sleeps_elsewhere) == []  # such a Flower breaks the contract


def _http_error(status: int):
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/send-task-heartbeat")
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=httpx.Response(status, request=request))


def test_flowers_task_retry_and_heartbeat_still_signal_the_process_which_the_warm_worker_overrides(
        sigints, monkeypatch):
    """If Flower stops signalling on a refused token or a task no longer held, the worker's overrides
    (``task.task_retry_invoker``, ``task.task_heartbeat``) can go: this test says when."""
    from types import SimpleNamespace

    from flwr.supercore import heartbeat
    from flwr.supercore.retry import http_retry

    monkeypatch.setattr(http_retry.time, "sleep", lambda seconds: None)  # Flower waits for its exit here
    http_retry.make_simple_http_retry_invoker().should_giveup(_http_error(401))
    assert sigints == [True]
    client = SimpleNamespace(SendTaskHeartbeat=lambda request: SimpleNamespace(success=False))
    heartbeat.make_task_heartbeat_fn_http(client)()
    assert sigints == [True, True]


def test_the_reply_loop_fedmm_replaces_has_grids_signature_and_uses_only_grids_own_methods():
    import inspect

    from flwr.serverapp import Grid
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedmm.deploy.flower import serverapp

    grid = list(inspect.signature(Grid.send_and_receive).parameters)
    assert list(inspect.signature(HttpGrid.send_and_receive).parameters) == grid
    assert ["grid", *grid[1:]] == list(inspect.signature(serverapp.send_and_receive).parameters)
    used = set(re.findall(r"grid\.(\w+)\(", inspect.getsource(serverapp.send_and_receive)))
    assert used == {"push_messages", "pull_messages"} and used <= Grid.__abstractmethods__


@pytest.mark.integration
def test_a_deployment_federation_forced_onto_stock_flower_runs_a_job_to_its_report(base_settings, tmp_path,
                                                                                    monkeypatch):
    from fedmm.config.text import format_run_config
    from fedmm.deploy.local import LocalFederation
    from fedmm.deploy.processes import processes_under
    from fedmm.pretrain import ensure_base_checkpoint

    ensure_base_checkpoint(base_settings, progress=False)
    monkeypatch.setenv(flower.SEAM_ENV, "stock")  # every process the federation starts inherits it
    out = tmp_path / "report"
    job = {**base_settings.to_run_config(), "num-server-rounds": 1, "local-steps": 2, "partitioner": "iid",
           "min-nodes": 2, "output-dir": str(out)}
    with LocalFederation(tmp_path / "home", 2, threads=1) as fed:
        code = fed.run(ROOT, format_run_config(job), stream=False, timeout=600)
        logs = {name: fed.log_file(name).read_text() for name in ("run", "superlink", "supernode-0", "supernode-1")}
    assert code == 0 and (out / "summary.md").is_file(), logs["run"][-3000:]
    for name in ("superlink", "supernode-0", "supernode-1"):
        assert "not changing Flower's internals (FEDMM_FLOWER_SEAM=stock)" in logs[name], logs[name][-2000:]
        assert "fedmm worker" not in logs[name]  # Flower ran each ClientApp task in its own process
    assert processes_under(tmp_path / "home") == []
