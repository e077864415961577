"""Starting Flower's processes: a port taken by someone else between choosing and binding it is not mistaken for ours."""

import json
import socket
import subprocess
import sys

import pytest

from fedmm.deploy import processes, simulation
from fedmm.deploy.processes import PortTaken, free_port, wait_for_port


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _binder(port: int) -> list[str]:
    """A process that binds ``port`` (and prints what uvicorn prints when it cannot), then stays up."""
    return [sys.executable, "-c", f"""
import socket, sys, time
s = socket.socket()
try:
    s.bind(("127.0.0.1", {port}))
except OSError as exc:
    print(f"error while attempting to bind: {{exc.strerror.lower()}}", flush=True)
    sys.exit(1)
s.listen()
time.sleep(30)
"""]


def test_another_processs_listener_is_not_taken_for_ours(tmp_path):
    other = _listener()
    port = other.getsockname()[1]
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_binder(port), stdout=out, stderr=subprocess.STDOUT)
    try:
        with pytest.raises(PortTaken, match=str(port)):
            wait_for_port(port, proc, "binder", log, timeout=20)
    finally:
        proc.kill()
        proc.wait()
        other.close()


def test_wait_for_port_returns_once_the_process_itself_listens(tmp_path):
    port = free_port()
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_binder(port), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, "binder", log, timeout=20)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_the_simulation_superlink_moves_to_a_fresh_port_when_its_port_is_taken(tmp_path, monkeypatch):
    other = _listener()
    taken = other.getsockname()[1]
    ports = iter([taken])
    monkeypatch.setattr(processes, "free_port", lambda: next(ports, None) or free_port())
    home = tmp_path / "flwr"
    home.mkdir()
    try:
        with simulation.SimulationSuperLink(home, home / "superlink.log") as link:
            assert link.port != taken
            assert "address already in use" not in (home / "superlink.log").read_text()
            assert link.proc is not None and link.proc.poll() is None
        assert link.processes() == []
    finally:
        other.close()


class _SlowGrid:
    """A grid whose replies arrive one per pull (what the ServerApp's HttpGrid sees on a busy federation)."""

    def __init__(self):
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        from types import SimpleNamespace

        self.pulls += 1
        first = sorted(ids)[:1]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in first]


def test_the_deployment_serverapp_pulls_replies_every_quarter_second_and_the_simulations_grid_is_untouched(
        monkeypatch):
    from flwr.superlink.grid import http_grid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedmm.deploy.flower import serverapp

    for module, name in ((http_grid, "pull_objects"), (http_grid.HttpGrid, "send_and_receive")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    flower_in_memory = InMemoryGrid.send_and_receive
    serverapp.poll_replies_often()
    waits = []
    monkeypatch.setattr(serverapp.time, "sleep", waits.append)
    grid = _SlowGrid()
    replies = http_grid.HttpGrid.send_and_receive(grid, ["a", "b", "c"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3 and waits == [serverapp.SERVER_PULL_INTERVAL] * 2
    assert InMemoryGrid.send_and_receive is flower_in_memory


def test_the_superlink_puts_fedmms_serverapp_first_on_the_superexecs_path(monkeypatch):
    import os
    import shutil

    from fedmm.deploy.flower import link

    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
    folder = link.serverapps_poll_often()
    try:
        found = shutil.which("flwr-serverapp")
        assert found == str(folder / "flwr-serverapp")
        assert "fedmm.deploy.flower.serverapp import main" in (folder / "flwr-serverapp").read_text()
    finally:
        shutil.rmtree(folder)


def test_a_supernode_started_by_fedmm_backs_off_between_empty_pulls_and_is_quick_after_work(monkeypatch):
    import time as real_time

    from flwr.supernode import start_client_internal

    from fedmm.deploy.flower import node

    for name in ("time", "pull_objects", "_pull_and_store_message"):  # restored after the test: no patch leaks
        monkeypatch.setattr(start_client_internal, name, getattr(start_client_internal, name))
    pulls = iter([None] * 5 + [7, None, None])
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda **kwargs: next(pulls))
    module = node.shorten_idle_poll()
    waits = []
    monkeypatch.setattr(real_time, "sleep", waits.append)

    def loop_turn() -> None:  # what Flower's loop does: pull; after an empty pull, its idle wait
        if module._pull_and_store_message(state=None) is None:
            module.time.sleep(3)

    for _ in range(5):
        loop_turn()
    assert waits == [0.5, 1.0, 2.0, 3, 3]
    loop_turn()  # a message: no idle wait, and the next empty pulls are quick again
    module.time.sleep(0.5)  # the loop's other waits are left as they are
    loop_turn()
    loop_turn()
    assert waits[5:] == [0.5, 0.5, 1.0] and module.time.time is real_time.time


def test_a_worker_polls_for_tasks_quickly_after_one_and_backs_off_when_idle():
    import threading

    from fedmm.deploy import clientapp_worker

    class Reply:
        def __init__(self, task: bool):
            self.token = "t" if task else ""

        def HasField(self, name: str) -> bool:
            return bool(self.token)

    class Runtime:
        def __init__(self, tasks: list[bool]):
            self.tasks = tasks

        def AcquireTask(self, request):
            return Reply(self.tasks.pop(0))

        def close(self):
            pass

    class Waits(threading.Event):
        def __init__(self):
            super().__init__()
            self.seen: list[float] = []

        def wait(self, timeout=None):
            self.seen.append(timeout)
            return False

    worker = clientapp_worker.ClientAppWorker.__new__(clientapp_worker.ClientAppWorker)
    worker.address, worker.stopped, worker.tasks_run = "127.0.0.1:0", Waits(), 0
    worker.task_ready = worker.reply_pushed = None  # a worker on its own: polls only
    worker._client = Runtime([False] * 7 + [True, False, True])
    ran = []
    worker.run_task = ran.append
    worker.serve(max_tasks=2)
    assert ran == ["t", "t"]
    assert worker.stopped.seen == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 0.1]


def test_core_slots_let_k_clientapp_calls_run_at_once(tmp_path):
    import threading
    import time

    from fedmm.deploy.core_slots import core_slot, make_core_slots

    slots = make_core_slots(tmp_path / "slots", 2)
    running, peak, lock = [0], [0], threading.Lock()

    def task():
        with core_slot(slots):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.2)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=task) for _ in range(5)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and time.perf_counter() - start >= 0.55  # 5 tasks of 0.2 s, two at a time: 3 waves
    with core_slot(None) as slot:  # no folder: no limit
        assert slot.waited == 0.0


def test_a_site_that_only_waits_lends_its_core_slot_to_the_others_and_takes_one_again_after(tmp_path):
    """A tier's delay (fedmm/pacing.py) is a slower device in wall time, not CPU: under one shared slot, the site
    waiting 1 s gives the slot back, another site trains meanwhile, and the waiter holds a slot again after."""
    import threading
    import time

    from fedmm import pacing
    from fedmm.deploy.core_slots import core_slot, make_core_slots

    slots = make_core_slots(tmp_path / "slots", 1)
    events: list[tuple[str, float]] = []
    waiting = threading.Event()

    def slow_site():
        with core_slot(slots) as slot, pacing.lend_during_waits(slot.released):
            waiting.set()
            pacing.wait(1.0)
            events.append(("slow site has a slot again", time.perf_counter()))

    fast_waited: list[float] = []

    def fast_site():
        waiting.wait(5)
        with core_slot(slots) as slot:
            events.append(("fast site trains", time.perf_counter()))
            time.sleep(0.2)
        fast_waited.append(slot.waited)

    threads = [threading.Thread(target=slow_site), threading.Thread(target=fast_site)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert [name for name, _ in events] == ["fast site trains", "slow site has a slot again"]
    assert fast_waited[0] < 0.5  # it did not wait out the slow site's second
    pacing.wait(0.0)  # outside a worker: a plain sleep, nothing lent


def test_core_slot_waiters_queue_on_the_turnstile_and_only_one_polls(tmp_path, monkeypatch):
    """Sites waiting for a slot sleep in the kernel, all but one: their polls preempted the training ones."""
    import threading
    import time

    from fedmm.deploy import core_slots

    slots = core_slots.make_core_slots(tmp_path / "slots", 1)
    polls = []

    class CountingTime:
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            polls.append(threading.get_ident())
            time.sleep(seconds)

    monkeypatch.setattr(core_slots, "time", CountingTime())
    got = []

    def wait_for_the_slot():
        with core_slots.core_slot(slots):
            got.append(threading.get_ident())

    waiters = [threading.Thread(target=wait_for_the_slot) for _ in range(4)]
    with core_slots.core_slot(slots):  # the one slot taken for 0.5 s
        for t in waiters:
            t.start()
        time.sleep(0.5)
        polled_while_held = list(polls)
    for t in waiters:
        t.join(timeout=10)
    # 0.5 s at one try per WAIT (0.05 s) is ~10 tries, all by the turnstile's holder; four pollers made ~40
    assert 5 <= len(polled_while_held) <= 15, len(polled_while_held)
    assert len(set(polled_while_held)) == 1
    assert len(got) == 4  # and each waiter got the slot in turn


def test_core_slot_waiters_that_arrive_together_go_longest_first_and_none_starves(tmp_path):
    """Ten sites, two slots: in arrival order a long task started last left the other slot idle at the end."""
    import threading
    import time

    from fedmm.deploy.core_slots import core_slot, make_core_slots

    slots = make_core_slots(tmp_path / "slots", 1)
    order = []

    def wait_for_the_slot(name, expected):
        with core_slot(slots, expected):
            order.append(name)

    # name, expected seconds, arrival (s): e arrives 0.85 s after d expecting only 0.1 s more, so d keeps its place
    waiters = [("a", 1.0, 0.0), ("b", 5.0, 0.05), ("c", 3.0, 0.1), ("d", 0.0, 0.15), ("e", 0.1, 1.0), ("f", 10.0, 1.05)]
    threads = []
    with core_slot(slots):  # the one slot taken while they all arrive
        start = time.perf_counter()
        for name, expected, arrival in waiters:
            time.sleep(max(0.0, start + arrival - time.perf_counter()))
            threads.append(threading.Thread(target=wait_for_the_slot, args=(name, expected)))
            threads[-1].start()
        time.sleep(0.25)
    for t in threads:
        t.join(timeout=10)
    assert order == ["f", "b", "c", "a", "d", "e"]
    assert not list((slots / "queue").iterdir())  # every waiter left the queue


def test_a_waiter_that_dies_in_the_core_slot_queue_does_not_hold_up_the_ones_behind_it(tmp_path):
    import os
    import signal
    import threading
    import time

    from fedmm.deploy.core_slots import core_slot, make_core_slots

    slots = make_core_slots(tmp_path / "slots", 1)
    got = threading.Event()

    def wait_for_the_slot():
        with core_slot(slots, 0.0):
            got.set()

    with core_slot(slots):
        dying = subprocess.Popen([sys.executable, "-c", (
            "import sys; from pathlib import Path; from fedmm.deploy.core_slots import core_slot\n"
            "with core_slot(Path(sys.argv[1]), 100.0):\n    pass"), str(slots)])
        try:
            deadline = time.time() + 30
            while not any(f"-{dying.pid}-" in p.name for p in (slots / "queue").iterdir()):
                assert time.time() < deadline and dying.poll() is None, "the subprocess never joined the queue"
                time.sleep(0.05)
            behind = threading.Thread(target=wait_for_the_slot)
            behind.start()  # queues behind the subprocess, which expects a longer task
            time.sleep(0.3)
        finally:
            os.kill(dying.pid, signal.SIGKILL)
            dying.wait()
    behind.join(timeout=5)
    assert got.is_set()
    assert not list((slots / "queue").iterdir())  # the dead waiter's ticket was cleared


def test_a_wakeup_ends_a_wait_at_once_across_processes_and_is_consumed():
    import subprocess
    import sys
    import time

    from fedmm.deploy.wakeup import Wakeup

    wake = Wakeup()
    assert not wake.wait(0.05)  # nobody notified: the wait runs out
    subprocess.run([sys.executable, "-c", f"import os; os.write({wake.write_fd}, b'!!')"], pass_fds=(wake.write_fd,),
                   check=True)
    start = time.perf_counter()
    assert wake.wait(30) and time.perf_counter() - start < 5
    assert not wake.wait(0.05)  # both bytes were one wake-up, consumed by that wait


def test_a_worker_joined_to_its_supernode_starts_a_stored_task_at_once_and_says_when_its_reply_is_pushed():
    import threading
    import time

    from fedmm.deploy import clientapp_worker
    from fedmm.deploy.wakeup import Wakeup

    stored = threading.Event()

    class Reply:
        def __init__(self):
            self.token = "t" if stored.is_set() else ""

        def HasField(self, name: str) -> bool:
            return bool(self.token)

    class Runtime:
        def AcquireTask(self, request):
            return Reply()

        def close(self):
            pass

    worker = clientapp_worker.ClientAppWorker.__new__(clientapp_worker.ClientAppWorker)
    worker.address, worker.stopped, worker.tasks_run, worker._client = "127.0.0.1:0", threading.Event(), 0, Runtime()
    worker.task_ready, worker.reply_pushed = Wakeup(), Wakeup()
    started = []
    worker.run_task = lambda token: started.append(time.perf_counter())

    def supernode() -> None:  # stores a message once the worker's polls have backed off past 1 s
        time.sleep(1.6)
        stored.set()
        stored.at = time.perf_counter()
        worker.task_ready.notify()

    threading.Thread(target=supernode).start()
    worker.serve(max_tasks=1)
    # polling alone would find it at 3.1 s (0.1 + 0.2 + 0.4 + 0.8 + 1.6), 1.5 s late
    assert started and started[0] - stored.at < 0.5
    assert worker.reply_pushed.wait(0)


def test_a_supernode_joined_to_its_worker_wakes_it_per_stored_message_and_stops_waiting_for_a_pushed_reply(
        monkeypatch):
    import threading
    import time
    import time as real_time

    from flwr.supernode import start_client_internal

    from fedmm.deploy.flower import node
    from fedmm.deploy.wakeup import Wakeup

    monkeypatch.setattr(start_client_internal, "time", real_time)  # restored after the test: no patch leaks
    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    pulls = iter([None, 7])
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda **kwargs: next(pulls))
    reply_pushed, message_stored = Wakeup(), Wakeup()
    module = node.shorten_idle_poll(reply_pushed=reply_pushed, message_stored=message_stored)
    assert module._pull_and_store_message(state=None) is None and not message_stored.wait(0)  # no message
    assert module._pull_and_store_message(state=None) == 7 and message_stored.wait(0)
    threading.Timer(0.1, reply_pushed.notify).start()
    start = time.perf_counter()
    module.time.sleep(30)  # the loop's wait for the reply ends when the worker has pushed it
    assert time.perf_counter() - start < 5


def test_the_server_and_the_supernode_retry_an_object_still_being_pushed_within_a_tenth_of_a_second(monkeypatch):
    import time
    import types

    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects
    from flwr.supernode import start_client_internal

    from fedmm.deploy.flower import node, pulls, serverapp

    for module in (http_grid, start_client_internal):  # restored after the test
        monkeypatch.setattr(module, "pull_objects", module.pull_objects)
    for name in ("time", "_pull_and_store_message"):
        monkeypatch.setattr(start_client_internal, name, getattr(start_client_internal, name))
    monkeypatch.setattr(http_grid.HttpGrid, "send_and_receive", http_grid.HttpGrid.send_and_receive)
    serverapp.poll_replies_often()  # the ServerApp
    node.shorten_idle_poll()  # the SuperNode
    assert http_grid.pull_objects.short_backoff and start_client_internal.pull_objects.short_backoff

    def sender_still_pushing(missing: int):
        def pull(object_id: str) -> bytes:
            tries[object_id] = tries.get(object_id, 0) + 1
            if tries[object_id] <= missing:
                raise ObjectUnavailableError(object_id)
            return object_id.encode()
        return pull

    for module in (http_grid, start_client_internal):
        tries: dict[str, int] = {}
        start = time.perf_counter()
        got = module.pull_objects(["a", "b"], pull_object_fn=sender_still_pushing(2))
        # Flower's own waits are 1 s then 2 s (+-20%): 2.4 s at least for two misses
        assert got == {"a": b"a", "b": b"b"} and tries == {"a": 3, "b": 3}
        assert time.perf_counter() - start < 1.0
    # Flower's patience is kept: more tries at the shorter waits, and a caller's own choice stands
    seen = {}
    fake = types.SimpleNamespace(pull_objects=lambda ids, **kw: seen.update(kw) or {})
    pulls.short_object_pull_backoff(fake)
    wrapped = fake.pull_objects
    pulls.short_object_pull_backoff(fake)  # idempotent: wrapped once
    assert fake.pull_objects is wrapped
    fake.pull_objects([], pull_object_fn=None, backoff_cap=2.0)
    assert seen["initial_backoff"] == pulls.PULL_BACKOFF[0] and seen["backoff_cap"] == 2.0
    assert seen["max_tries_per_object"] * pulls.PULL_BACKOFF[1] >= 500 * 10
    assert pull_objects is not http_grid.pull_objects


_FREE_AND_TAKE_AGAIN = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from fedmm.deploy.supernode import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(4):  # as a training step does: ~100 MiB of activations taken, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(2**20, dtype=np.uint8) for _ in range(100)]
    del arrays
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults_per_pass(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _FREE_AND_TAKE_AGAIN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_keeps_the_memory_a_step_frees_instead_of_faulting_it_in_again():
    pages = 100 * 2**20 // 4096
    default, kept = _faults_per_pass("default"), _faults_per_pass("keep")
    # glibc's default hands the freed top of the heap back, so every pass faults its pages in again
    assert min(default[1:]) > pages // 2, default
    # the worker's heap keeps them: only the first pass takes new pages
    assert kept[0] > pages // 2 and max(kept[1:]) < pages // 20, kept


def _http_error(status: int):
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/send-task-heartbeat")
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=httpx.Response(status, request=request))


def test_a_refused_task_token_ends_the_call_and_not_the_worker_process(sigints):
    """A heartbeat that fell between a reply's push and its task's end was refused (401) and Flower's retry
    sent SIGINT to the worker: the site stopped and the run waited for it forever."""
    import time

    from fedmm.deploy.flower.task import task_retry_invoker

    def refused():
        raise _http_error(401)

    start = time.perf_counter()
    with pytest.raises(Exception, match="HTTP 401"):
        task_retry_invoker().invoke(refused)
    assert sigints == [] and time.perf_counter() - start < 1.0
    calls = []

    def unavailable_once():  # Flower's retry of a busy SuperNode is kept
        calls.append(1)
        if len(calls) == 1:
            raise _http_error(503)
        return "ok"

    assert task_retry_invoker().invoke(unavailable_once) == "ok" and len(calls) == 2


def test_a_task_the_supernode_no_longer_holds_stops_its_heartbeats_without_signalling(sigints):
    from types import SimpleNamespace

    from fedmm.deploy.flower.task import task_heartbeat

    class Client:
        def __init__(self, answer):
            self.answer, self.calls = answer, 0

        def SendTaskHeartbeat(self, request):  # noqa: N802 (Flower's name)
            self.calls += 1
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    held = Client(SimpleNamespace(success=True))
    beat = task_heartbeat(held)
    assert beat() and beat() and held.calls == 2
    for answer in (SimpleNamespace(success=False), _http_error(401)):
        client = Client(answer)
        beat = task_heartbeat(client)
        assert beat() is True and beat() is True  # no retry of a task that is gone ...
        assert client.calls == 1  # ... and no more heartbeats for it
    busy = Client(_http_error(503))
    assert task_heartbeat(busy)() is False  # a busy SuperNode: Flower's HeartbeatSender retries
    assert sigints == []
