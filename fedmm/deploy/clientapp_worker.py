"""A long-lived ClientApp process for one SuperNode.

Flower's SuperNode (1.41, 1.42) starts a fresh ``flwr-clientapp`` process for every
message (``--isolation subprocess``): each train or evaluate message pays
~7 s of imports and rebuilds the model and the partition, so a deployment
round took 6-10x a simulation round. With ``flower-supernode --isolation
process`` the SuperNode only queues tasks on its Runtime API and leaves
running them to an outside executor. This is that executor: one process per
SuperNode that acquires each ClientApp task and runs it in-process, with
Flower's own task protocol (pull input, run the app, push the reply and the
context, heartbeats). Imports, and the model and data the ClientApp caches
per run (``clients/app.py``), survive from one message to the next.

What changes against ``flwr-clientapp``: nothing the server can see. Context
state still lives on the SuperNode and is pushed back after every task; an
exception in the ClientApp becomes an error reply, as there. A new app
version (FAB hash) unloads the previous version's modules first. Runtime
dependency installation is not supported: the worker runs the environment it
was started in.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmm.logs import quiet_root_logger

if TYPE_CHECKING:  # Flower's modules load lazily, as everywhere in this file
    from flwr.supercore.retry import RetryInvoker
    from flwr.supercore.runtime import RuntimeHttpClient

from .core_slots import core_slot
from .polling import PULL_BACKOFF, Wakeup

log = logging.getLogger("fedmm.worker")

# Polling for a task backs off from POLL_FIRST to POLL_IDLE, doubling after each empty poll, and starts
# again after a task. Each poll is an HTTP request the SuperNode serves: ten idle workers at 0.5 s kept
# 17% of a core busy, and the old 0.05 s for 5 s after every task ~1.7 s of CPU per task, taken from
# the training beside it. The SuperNode itself waits up to 3 s between its pulls, so 2 s here adds
# little to a task's pickup.
POLL_FIRST, POLL_IDLE = 0.1, 2.0

# Heavy imports a ClientApp of this project needs; loaded once, before the first task.
WARM_MODULES = ("torch", "open_clip", "peft", "opacus", "fedmm.model", "fedmm.train", "fedmm.evaluate")


class ClientAppWorker:
    """Acquire and run ClientApp tasks from one SuperNode's Runtime API, forever or until stopped."""

    def __init__(self, runtime_api_address: str, *, warm: bool = True, core_slots: Path | None = None,
                 task_ready: Wakeup | None = None, reply_pushed: Wakeup | None = None):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = runtime_api_address
        self.core_slots = core_slots  # shared with the machine's other workers: K ClientApp calls at a time
        self.stopped = threading.Event()
        # notified by the SuperNode when it has stored a message; this worker notifies reply_pushed after a task
        self.task_ready, self.reply_pushed = task_ready, reply_pushed
        self.tasks_run = 0
        # ClientApp seconds of the last task of each message type: the next one's expected length, by which
        # the machine's core slots go to the longest task first
        self.last_seconds: dict[str, float] = {}
        self._app_dir: Path | None = None
        self._fab_hash: str | None = None  # the app version loaded now, and its ClientApp
        self._app: Any = None
        # The Runtime API is the SuperNode's own loopback endpoint (same host
        # or container); the SuperLink connection is the one that uses TLS.
        # No retry invoker on the polling client: Flower's retries forever,
        # and the loop below must notice stop() while the SuperNode is down.
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        )
        if warm:
            for name in WARM_MODULES:
                importlib.import_module(name)
            # Opacus's import gives the root logger a handler: this process's lines would print twice
            quiet_root_logger()

    def serve(self, max_tasks: int | None = None) -> None:
        from flwr.supercore.constant import TaskType
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

        log.info("fedmm worker: serving ClientApp tasks of the SuperNode at %s", self.address)
        wait = POLL_FIRST
        while not self.stopped.is_set() and (max_tasks is None or self.tasks_run < max_tasks):
            try:
                res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode restarting: keep polling
                log.debug("fedmm worker: AcquireTask failed: %s", exc)
                self.stopped.wait(1.0)
                continue
            if res.HasField("task") and res.token:
                self.run_task(res.token)
                self.tasks_run += 1
                if self.reply_pushed is not None:
                    self.reply_pushed.notify()
                wait = POLL_FIRST
            elif self.task_ready is not None and self.task_ready.wait(wait):
                wait = POLL_FIRST
            else:
                if self.task_ready is None:
                    self.stopped.wait(wait)
                wait = min(2 * wait, POLL_IDLE)
        self._client.close()

    def stop(self) -> None:
        self.stopped.set()
        if self.task_ready is not None and self.task_ready.write_fd is not None:
            self.task_ready.notify()  # end the wait in serve() now

    def run_task(self, token: str) -> None:
        """One ClientApp execution, as ``flwr.supernode.runtime.run_clientapp`` does it, minus the exit."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=task_retry_invoker(),
        )
        heartbeat = HeartbeatSender(task_heartbeat(client))
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        started = pulled = ran = time.perf_counter()
        waited = 0.0
        try:
            heartbeat.start()
            message, context, fab = pull_task_input(client)
            if fab.hash_str != self._fab_hash:  # install and load once per app version, not per message
                self._app = self._load(Path(install_from_fab(fab.content, skip_prompt=True)))
                self._fab_hash = fab.hash_str
            client_app = self._app
            pulled = time.perf_counter()
            kind = message.metadata.message_type
            with core_slot(self.core_slots, self.last_seconds.get(kind, 0.0)) as waited:
                reply = client_app(message=message, context=context)
            ran = time.perf_counter()
            self.last_seconds[kind] = ran - pulled - waited
            status, details = SubStatus.COMPLETED, ""
            if heartbeat.is_running:  # pushing the reply completes the task: a heartbeat after it is refused
                heartbeat.stop()
        except Exception as ex:  # pylint: disable=broad-exception-caught
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(ex)}:<'{ex}'>"
            log.error("fedmm worker: the ClientApp raised", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log.error("fedmm worker: failed to push the reply", exc_info=ex)
            try:  # the SuperNode may have failed the task itself (e.g. its pull from the SuperLink failed)
                push_task_output(client, context, status, details)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log.error("fedmm worker: failed to push the task's status: %s", ex)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        kind = message.metadata.message_type if message is not None else "?"
        log.info("fedmm worker: %s task in %.2f s (pull %.2f, core slot %.2f, ClientApp %.2f, push %.2f; %s)", kind,
                 time.perf_counter() - started, pulled - started, waited, max(ran - pulled - waited, 0),
                 time.perf_counter() - max(ran, pulled), status)

    def _load(self, app_dir: Path):
        """The app's ClientApp; a different app version first drops the previous one's modules."""
        from flwr.clientapp.client_app import ClientApp, LoadClientAppError
        from flwr.common.config import get_project_config
        from flwr.supercore.object_ref import load_app

        if self._app_dir is not None and self._app_dir != app_dir:
            old = str(self._app_dir)
            for name, module in list(sys.modules.items()):
                if (getattr(module, "__file__", None) or "").startswith(old):
                    del sys.modules[name]
            if old in sys.path:
                sys.path.remove(old)
        self._app_dir = app_dir
        ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
        app = load_app(ref, LoadClientAppError, app_dir)
        if not isinstance(app, ClientApp):
            raise LoadClientAppError(f"{ref} is not a ClientApp")
        return app


def pull_task_input(client: Any) -> tuple[Any, Any, Any]:
    """Message, context and FAB of the acquired task (``run_clientapp.pull_task_input``, faster retries).

    The SuperNode hands out a task before it has fetched the message's
    objects from the SuperLink. Flower's own pull retries after 1, 2, 4, 8 s,
    which a fresh process hides behind its imports; a warm worker would sit
    out that backoff on every message, so it retries every 0.05-0.5 s.
    """
    from flwr.common.serde import context_from_proto, fab_from_proto
    from flwr.app import Message
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context = context_from_proto(res.context)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_BACKOFF[0],
        backoff_cap=PULL_BACKOFF[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, fab_from_proto(res.fab)


def task_retry_invoker() -> RetryInvoker:
    """Flower's HTTP retries for one task's Runtime API calls, except that a refused token ends the call.

    ``make_simple_http_retry_invoker`` answers a 401 (the task's token is no
    longer valid: its reply was already taken, the SuperNode gave the task
    up, or the run was stopped) by sending SIGINT to its own process, which
    ends a one-shot ``flwr-clientapp``. In this long-lived worker it ended the
    whole site: a heartbeat that fell between the reply's push and the task's
    end stopped the SuperNode, and the run waited for it forever. Here the
    call raises its ``HTTPStatusError`` instead, the task ends with it
    (``run_task`` logs it), and the worker serves the next one.
    """
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    invoker = make_simple_http_retry_invoker()
    flower_should_giveup = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return flower_should_giveup(exc)

    invoker.should_giveup = should_giveup
    return invoker


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task's heartbeat (Flower's ``make_task_heartbeat_fn_http``) that never signals this process.

    Flower's raises SIGINT when the SuperNode answers that the task is no
    longer claimed, to end a one-shot ClientApp process; here that would end
    the site. A task the SuperNode no longer holds is logged and its
    heartbeats stop; its reply, if one comes, is refused at the push, and the
    worker goes on.
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    gone = threading.Event()

    def beat() -> bool:
        if gone.is_set():
            return True
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False  # retried by the HeartbeatSender
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            log.warning("fedmm worker: the SuperNode refused the task's heartbeat (HTTP %d); the task is no "
                        "longer its own", err.response.status_code)
            gone.set()
            return True
        if not res.success:
            log.warning("fedmm worker: the SuperNode no longer holds this task; its reply will be refused")
            gone.set()
        return True

    return beat
