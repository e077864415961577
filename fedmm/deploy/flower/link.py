"""``fedmm superlink``: Flower's ``flower-superlink`` with message payloads in memory and a quicker ServerApp.

Flower keeps the SuperLink's LinkState (runs, nodes, message metadata) and
its ObjectStore (message payloads: every array of every message) in the one
SQLite file ``--database`` names. Each payload is written once and deleted
as soon as its receiver has pulled it, so with N SuperNodes pulling at once
every pull is a write on that file; on a loaded machine the writes queue
past SQLite's 5 s busy timeout, the SuperLink answers ``database is
locked`` and the SuperNodes back off for up to 10 s per try.

This launcher runs Flower's own SuperLink with every option the user gives,
changing three things:

- a file ``--database`` holds the LinkState only, and the payloads live in
  Flower's ``InMemoryObjectStore``. A restarted SuperLink still keeps its
  runs, nodes and their statuses; what it loses is the payloads of messages
  in flight, which belonged to the ServerApp that the restart stopped anyway;
- SQLite's busy timeout is ``BUSY_TIMEOUT_MS`` instead of 5 s. Every object
  pull still adds to its run's traffic counters in the file; a write that
  waits its turn is slower, one that fails is a message the SuperNode drops,
  and a round that waits for its reply forever;
- the ServerApps it starts are ``serverapp.py``'s: replies pulled every 0.25 s.

Without usable internals it runs ``flower-superlink`` unchanged.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import internals_usable, serverapp
from .pulls import run_entry_point

BUSY_TIMEOUT_MS = 60_000


def _is_sqlite_file(database: str) -> bool:
    value = database.strip()
    if value.startswith(":") and value.endswith(":"):  # :memory:, :flwr-in-memory:
        return False
    return "://" not in value or value.startswith("sqlite:///") and not value.endswith(":memory:")


def payloads_in_memory() -> None:
    """Make the SuperLink built in this process keep its ObjectStore in memory (LinkState as asked)."""
    import flwr.supercore.sql_mixin as sql_mixin
    import flwr.superlink.main as superlink_main
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory

    setattr(sql_mixin, "SQLITE_PRAGMAS", tuple((name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
                                              for name, value in sql_mixin.SQLITE_PRAGMAS))
    flower_factories = superlink_main.get_objectstore_linkstate_factories

    def factories(database: str, federation_manager: Any) -> tuple[ObjectStoreFactory, LinkStateFactory]:
        if not _is_sqlite_file(database):
            return flower_factories(database, federation_manager)
        objects = ObjectStoreFactory()  # Flower's default: the in-memory store
        return objects, LinkStateFactory(database, federation_manager, objects)

    setattr(superlink_main, "get_objectstore_linkstate_factories", factories)


def serverapps_poll_often() -> Path:
    """Put ``serverapp.py``'s ``flwr-serverapp`` first on this process's PATH (for the SuperExec it starts)."""
    folder = serverapp.install(Path(tempfile.mkdtemp(prefix="fedmm-serverapp-")))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["PATH"] = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
    return folder


def run_superlink(flower_args: list[str]) -> int:
    """Run ``flower-superlink <flower_args>`` in this process, changed as above; returns its exit code."""
    from flwr.superlink.cli import flower_superlink

    if internals_usable():
        payloads_in_memory()
        serverapps_poll_often()
    return run_entry_point("flower-superlink", flower_superlink, flower_args)
