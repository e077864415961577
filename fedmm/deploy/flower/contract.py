"""What fedmm's changes to Flower expect of Flower: checked once per process, before any of them applies.

Each entry of ``CONTRACTS`` names one change and checks, by importing and
reading Flower's own code (never by restating its values), that every
internal it calls or replaces exists with the shape it relies on. A failed
check is a sentence naming the Flower module and what is missing; any
failure, or a Flower version outside ``CHECKED_VERSIONS``, makes the seam
fall back to stock Flower (``fedmm/deploy/flower/__init__.py``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# Flower releases (major.minor) whose internals these changes were read against and tested on
CHECKED_VERSIONS = ("1.42",)

NODE_LOOP = "flwr.supernode.start_client_internal"
HTTP_GRID = "flwr.superlink.grid.http_grid"
INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"


class ContractBroken(Exception):
    """One expectation about Flower's internals does not hold."""


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ContractBroken(f"{name} cannot be imported ({exc})") from exc


def _attr(module_name: str, *path: str) -> Any:
    value = _module(module_name)
    for name in path:
        if not hasattr(value, name):
            raise ContractBroken(f"{module_name} has no {'.'.join(path)}")
        value = getattr(value, name)
    return value


def _params(fn: Callable[..., Any], where: str, *names: str) -> None:
    try:
        have = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise ContractBroken(f"{where} has no readable signature ({exc})") from exc
    missing = [n for n in names if n not in have]
    if missing:
        raise ContractBroken(f"{where} takes no {', '.join(missing)} (it takes {', '.join(have)})")


def _syntax(fn: Callable[..., Any], where: str) -> ast.AST:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError) as exc:
        raise ContractBroken(f"{where}: its source cannot be read ({exc})") from exc


def _is_call(node: ast.AST, name: str) -> bool:
    """``node`` is a call of ``name`` (``f(...)``) or of an attribute so named (``m.f(...)``)."""
    if not isinstance(node, ast.Call):
        return False
    fn = node.func
    dotted = fn.id if isinstance(fn, ast.Name) else (
        f"{fn.value.id}.{fn.attr}" if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else "")
    return dotted == name


def idle_waits(loop: Callable[..., Any]) -> list[ast.Call]:
    """The ``time.sleep`` calls Flower's SuperNode loop makes right after a pull that brought no message.

    Flower's loop is ``run_id = _pull_and_store_message(...)`` then ``if run_id is None: time.sleep(...)``;
    the back-off (``node.py``) relies on exactly that: a sleep that follows an empty pull is the idle wait.
    """
    found: list[ast.Call] = []
    for node in ast.walk(_syntax(loop, f"{NODE_LOOP}.start_client_internal")):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for first, then in zip(body, body[1:]):
            if not (isinstance(first, ast.Assign) and len(first.targets) == 1
                    and isinstance(first.targets[0], ast.Name) and _is_call(first.value, "_pull_and_store_message")):
                continue
            pulled = first.targets[0].id
            test = then.test if isinstance(then, ast.If) else None
            if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == pulled
                    and isinstance(test.ops[0], ast.Is) and isinstance(test.comparators[0], ast.Constant)
                    and test.comparators[0].value is None):
                found += [n for s in then.body for n in ast.walk(s)
                          if isinstance(n, ast.Call) and _is_call(n, "time.sleep")]
    return found


def _node_loop() -> None:
    module = _module(NODE_LOOP)
    for name in ("time", "pull_objects", "_pull_and_store_message", "start_client_internal"):
        _attr(NODE_LOOP, name)
    if getattr(module.time, "__name__", "") != "time":
        raise ContractBroken(f"{NODE_LOOP}.time is not the time module")
    if len(idle_waits(module.start_client_internal)) != 1:
        raise ContractBroken(f"{NODE_LOOP}.start_client_internal: no single time.sleep right after a "
                             "_pull_and_store_message that returned None (the idle wait the back-off replaces)")
    _attr("flwr.supernode.cli", "flower_supernode")


def _object_pulls() -> None:
    _params(_attr(INFLATABLE, "pull_objects"), f"{INFLATABLE}.pull_objects",
            "initial_backoff", "backoff_cap", "max_tries_per_object")
    _params(_attr(INFLATABLE, "pull_and_inflate_object_from_tree"), f"{INFLATABLE}.pull_and_inflate_object_from_tree",
            "initial_backoff", "backoff_cap")
    for name in ("PULL_BACKOFF_CAP", "PULL_MAX_TRIES_PER_OBJECT"):
        _attr("flwr.supercore.constant", name)
    for module in (NODE_LOOP, HTTP_GRID):
        if _attr(module, "pull_objects") is not _attr(INFLATABLE, "pull_objects"):
            raise ContractBroken(f"{module}.pull_objects is not {INFLATABLE}.pull_objects")


def _server_grid() -> None:
    http_grid = _attr(HTTP_GRID, "HttpGrid")
    grid = _attr("flwr.serverapp", "Grid")
    ours = list(inspect.signature(http_grid.send_and_receive).parameters)
    theirs = list(inspect.signature(grid.send_and_receive).parameters)
    if ours != theirs:
        raise ContractBroken(f"{HTTP_GRID}.HttpGrid.send_and_receive{ours} is not Grid's {theirs}")
    for name in ("push_messages", "pull_messages"):
        if name not in getattr(grid, "__abstractmethods__", ()):
            raise ContractBroken(f"flwr.serverapp.Grid.{name} is no longer part of the Grid interface")
    _attr("flwr.superlink.cli", "flwr_serverapp")
    command = _attr("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND")
    server_app = _attr("flwr.supercore.constant", "TaskType", "SERVER_APP")
    if command.get(server_app) != "flwr-serverapp":
        raise ContractBroken("the SuperExec no longer starts a ServerApp as 'flwr-serverapp' from the PATH")


def _superlink_store() -> None:
    pragmas = _attr("flwr.supercore.sql_mixin", "SQLITE_PRAGMAS")
    if not any(isinstance(p, tuple) and len(p) == 2 and p[0] == "busy_timeout" for p in pragmas):
        raise ContractBroken("flwr.supercore.sql_mixin.SQLITE_PRAGMAS sets no busy_timeout")
    factories = _attr("flwr.superlink.main", "get_objectstore_linkstate_factories")
    _params(factories, "flwr.superlink.main.get_objectstore_linkstate_factories", "database", "federation_manager")
    _params(_attr("flwr.server.superlink.linkstate", "LinkStateFactory"),
            "flwr.server.superlink.linkstate.LinkStateFactory", "database", "federation_manager")
    _attr("flwr.supercore.object_store", "ObjectStoreFactory")
    _attr("flwr.superlink.cli", "flower_superlink")


_TASK_NAMES = {
    "flwr.supercore.runtime": ("RuntimeHttpClient",),
    "flwr.supercore.interceptors": ("RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor"),
    "flwr.supercore.heartbeat": ("HeartbeatSender",),
    "flwr.supercore.retry": ("make_simple_http_retry_invoker",),
    "flwr.supercore.task_identity": ("TaskIdentity",),
    "flwr.supercore.constant": ("TaskType",),
    "flwr.supernode.runtime.run_clientapp": ("push_message", "push_task_output", "pull_task_input"),
    "flwr.supercore.inflatable.inflatable_protobuf_utils": ("make_confirm_message_received_fn_protobuf",
                                                            "make_pull_object_fn_protobuf"),
    "flwr.proto.runtime_pb2": ("AcquireTaskRequest", "PullAppMessagesRequest", "PullTaskInputRequest",
                               "SendTaskHeartbeatRequest"),
    "flwr.proto.node_pb2": ("Node",),
    "flwr.common.serde": ("context_from_proto", "fab_from_proto"),
    "flwr.common.constant": ("ErrorCode", "SubStatus"),
    "flwr.common.config": ("get_project_config",),
    "flwr.cli.install": ("install_from_fab",),
    "flwr.clientapp.client_app": ("ClientApp", "LoadClientAppError"),
    "flwr.supercore.object_ref": ("load_app",),
}


def _task_protocol() -> None:
    for module, names in _TASK_NAMES.items():
        for name in names:
            _attr(module, name)
    _params(_attr("flwr.supercore.runtime", "RuntimeHttpClient", "from_server_address"),
            "RuntimeHttpClient.from_server_address", "server_address", "insecure", "root_certificates",
            "interceptors", "retry_invoker")
    if not hasattr(_attr("flwr.supercore.retry", "make_simple_http_retry_invoker")(), "should_giveup"):
        raise ContractBroken("flwr.supercore.retry.make_simple_http_retry_invoker() has no should_giveup")
    identity = _attr("flwr.supercore.task_identity", "TaskIdentity")
    settable = [getattr(type(identity), name, None) for name in ("task_id", "run_id", "node_id")]
    if not all(isinstance(p, property) and p.fset is not None for p in settable):
        raise ContractBroken("flwr.supercore.task_identity.TaskIdentity lacks a settable task_id, run_id or node_id")
    request = _attr("flwr.proto.runtime_pb2", "AcquireTaskRequest")
    if "supported_task_types" not in request.DESCRIPTOR.fields_by_name:
        raise ContractBroken("flwr.proto.runtime_pb2.AcquireTaskRequest has no supported_task_types")
    # the worker sets a pulled message's id as Flower's own task input does
    pull = _syntax(_attr("flwr.supernode.runtime.run_clientapp", "pull_task_input"), "run_clientapp.pull_task_input")
    if not any(isinstance(n, ast.Constant) and n.value == "_message_id" for n in ast.walk(pull)):
        raise ContractBroken("flwr.supernode.runtime.run_clientapp.pull_task_input no longer sets _message_id")


def _app_files() -> None:
    for name in ("build_pathspec", "filter_paths_for_publish", "load_gitignore_patterns"):
        _attr("flwr.cli.utils", name)


CONTRACTS: dict[str, Callable[[], None]] = {
    "SuperNode idle back-off and wake-ups (node.py)": _node_loop,
    "short object-pull retries (node.py, serverapp.py, task.py)": _object_pulls,
    "ServerApp reply polling (serverapp.py)": _server_grid,
    "SuperLink payloads in memory (link.py)": _superlink_store,
    "warm ClientApp worker (task.py)": _task_protocol,
    "app staging (app_files.py)": _app_files,
}


def flower_version() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "unknown"


def broken_contracts() -> list[str]:
    """Every expectation that does not hold on the installed Flower (empty: all of fedmm's changes apply)."""
    found = flower_version()
    broken = [] if ".".join(found.split(".")[:2]) in CHECKED_VERSIONS else [
        f"Flower {found} is not a version these changes were checked against ({', '.join(CHECKED_VERSIONS)})"]
    for change, check in CONTRACTS.items():
        try:
            check()
        except ContractBroken as exc:
            broken.append(f"{change}: {exc}")
    return broken
