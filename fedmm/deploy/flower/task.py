"""Flower's ClientApp task protocol, for a worker that runs many tasks in one process.

``flwr-clientapp`` (Flower's ``run_clientapp``) runs one task and exits:
acquire a token, pull the task's input (message, context, FAB), run the
app, push the reply and the context, heartbeat meanwhile. The warm worker
(``fedmm/deploy/clientapp_worker.py``) does the same for task after task;
this module is every call it makes to Flower, as Flower makes it, except:

- the message's objects are retried after 0.05-0.5 s (``pulls.PULL_BACKOFF``),
  not 1, 2, 4, 8 s: the SuperNode hands out a task before it has fetched
  them, which a fresh process hides behind its imports and a warm one would
  sit out on every message;
- nothing ever signals the process. Flower's HTTP retry answers a refused
  token (401) with SIGINT, and its heartbeat answers "task no longer
  claimed" the same way, to end a one-shot ``flwr-clientapp``; in a
  long-lived worker that ended the whole site (a heartbeat that fell between
  the reply's push and the task's end stopped the SuperNode, and the run
  waited for it forever). Here the call raises, or the heartbeats stop, the
  task ends, and the worker serves the next one.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .pulls import PULL_BACKOFF

if TYPE_CHECKING:  # Flower's modules load lazily, as everywhere in the seam
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.supercore.retry import RetryInvoker
    from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger("fedmm.worker")


def runtime_client(address: str, token: str | None = None) -> RuntimeHttpClient:
    """A client of the SuperNode's loopback Runtime API: the worker's poller (no token, no retries: it must
    notice a stop while the SuperNode is down) or one task's (its token, ``task_retry_invoker``)."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    if token is None:
        return RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=task_retry_invoker())


def acquire_task(client: Any) -> str | None:
    """The token of a ClientApp task the SuperNode has queued, or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return res.token if res.HasField("task") and res.token else None


class Task:
    """One acquired ClientApp task: its input, its heartbeat, and the outcome it reports."""

    def __init__(self, address: str, token: str) -> None:
        from flwr.supercore.heartbeat import HeartbeatSender

        self.client = runtime_client(address, token)
        self.heartbeat = HeartbeatSender(task_heartbeat(self.client))
        self.message: Message | None = None
        self.context: Context | None = None

    def __enter__(self) -> Task:
        self.heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.heartbeat.is_running:
            self.heartbeat.stop()
        self.client.close()

    def pull(self) -> tuple[Message, Context, str, bytes]:
        """Message, context, and the app's FAB (hash, content); as ``run_clientapp.pull_task_input``."""
        from flwr.app import Message
        from flwr.common.serde import context_from_proto, fab_from_proto
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
        from flwr.supercore.task_identity import TaskIdentity

        client = self.client
        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            res.task_id, res.run.run_id, res.context.node_id)
        context = context_from_proto(res.context)
        self.context = context
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
        self.message = message
        fab = fab_from_proto(res.fab)
        return message, context, fab.hash_str, fab.content

    def ran(self) -> None:
        """The ClientApp returned: stop the heartbeats (pushing the reply completes the task, and a heartbeat
        after that is refused)."""
        if self.heartbeat.is_running:
            self.heartbeat.stop()

    def finish(self, reply: Message | None, error: BaseException | None = None) -> str:
        """Push the reply (an error reply where the app failed) and the task's status; returns the status."""
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        status, details = SubStatus.COMPLETED, ""
        if error is not None or reply is None:
            reason = f"{type(error)}:<'{error}'>" if error is not None else "ClientApp task failed due to unknown reason"
            status, details = SubStatus.FAILED, reason
            if self.message is not None:
                code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(error, LoadClientAppError)
                        else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
                reply = Message(Error(code=code, reason=reason), reply_to=self.message)
        try:
            if reply is not None and self.context is not None:
                push_message(self.client, reply, self.context)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log.error("fedmm worker: failed to push the reply", exc_info=ex)
        try:  # the SuperNode may have failed the task itself (e.g. its pull from the SuperLink failed)
            push_task_output(self.client, self.context, status, details)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log.error("fedmm worker: failed to push the task's status: %s", ex)
        return str(status)


def install_app(fab_content: bytes) -> Path:
    """The FAB installed as Flower installs it; returns the app's folder."""
    from flwr.cli.install import install_from_fab

    return Path(install_from_fab(fab_content, skip_prompt=True))


def load_clientapp(app_dir: Path, previous_dir: Path | None) -> ClientApp:
    """The app's ClientApp; a different app version first drops the previous one's modules."""
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError
    from flwr.common.config import get_project_config
    from flwr.supercore.object_ref import load_app

    if previous_dir is not None and previous_dir != app_dir:
        old = str(previous_dir)
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(old):
                del sys.modules[name]
        if old in sys.path:
            sys.path.remove(old)
    ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
    app = load_app(ref, LoadClientAppError, app_dir)
    if not isinstance(app, ClientApp):
        raise LoadClientAppError(f"{ref} is not a ClientApp")
    return app


def task_retry_invoker() -> RetryInvoker:
    """Flower's HTTP retries for one task's Runtime API calls, except that a refused token (401) ends the call
    with its ``HTTPStatusError`` instead of signalling the process."""
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    invoker = make_simple_http_retry_invoker()
    flower_should_giveup = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return flower_should_giveup is not None and flower_should_giveup(exc)

    invoker.should_giveup = should_giveup
    return invoker


def task_heartbeat(client: Any) -> Any:
    """A task's heartbeat (Flower's ``make_task_heartbeat_fn_http``) that never signals this process: a task the
    SuperNode no longer holds is logged and its heartbeats stop; its reply, if one comes, is refused at the push."""
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
