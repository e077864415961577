"""The seam: everything fedmm takes from Flower's internals, and the one switch that turns it all off.

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
its logger, DP constants and accountant, secure-aggregation primitives and
the documented CLIs) is used anywhere in fedmm. Everything else fedmm needs
from Flower, it needs to make a deployment on one machine fast and sturdy,
and that lives here, one file per process it changes:

- ``node.py``: the SuperNode (``fedmm supernode``): its idle message poll backs off from 0.5 s to
  Flower's wait, it wakes the ClientApp worker when a message is stored and stops waiting for a
  reply when the worker has pushed it, and it retries an object still being pushed after 0.05 s;
- ``task.py``: the SuperNode's long-lived ClientApp worker (``fedmm/deploy/clientapp_worker.py``):
  Flower's ClientApp task protocol, run in a warm process instead of a fresh ``flwr-clientapp`` per
  message, with heartbeats and retries that never signal the process;
- ``link.py``: the SuperLink (``fedmm superlink``): message payloads in memory, a longer SQLite
  busy timeout, and ``serverapp.py`` put in front of ``flwr-serverapp`` on the SuperExec's PATH;
- ``serverapp.py``: the deployment ServerApp process: replies pulled every 0.25 s instead of 3 s,
  objects still being pushed retried after 0.05 s;
- ``app_files.py``: the files ``flwr run`` puts in the app's FAB, found without walking ignored folders.

``contract.py`` says what each of them expects of Flower: the versions it
was checked against and, for each internal it calls or replaces, that it
exists with the shape it relies on. ``internals_usable()`` checks all of it
once per process. Where any of it does not hold (another Flower, or
``FEDMM_FLOWER_SEAM=stock`` in the environment) every part falls back to
stock Flower at once: ``flower-supernode`` starting a ``flwr-clientapp``
process per message, ``flower-superlink`` as it is, Flower's 3 s polls, and
``flwr run`` on the app folder itself. That is slower (docs/benchmarks-log.md
measures both) and never silent: the first use logs what failed and what
runs instead.
"""

from __future__ import annotations

import logging
import os
from functools import cache

from .contract import broken_contracts

log = logging.getLogger("fedmm.flower")

SEAM_ENV = "FEDMM_FLOWER_SEAM"
SEAM_MODES = ("auto", "stock")  # auto: fedmm's changes where Flower's internals match; stock: never
FALLBACK = ("stock Flower: flower-supernode with a flwr-clientapp process per message, flower-superlink with "
            "payloads in its database, 3 s polls, flwr run on the app folder")


@cache
def internals_usable() -> bool:
    """Whether this process may use fedmm's changes to Flower; logs once, naming the fallback, when not."""
    mode = os.environ.get(SEAM_ENV, "auto").strip().lower() or "auto"
    if mode not in SEAM_MODES:
        raise ValueError(f"environment variable {SEAM_ENV} = {mode!r}: expected one of {', '.join(SEAM_MODES)}")
    reasons = [f"{SEAM_ENV}=stock"] if mode == "stock" else broken_contracts()
    if reasons:
        log.warning("fedmm: not changing Flower's internals (%s); running %s", "; ".join(reasons), FALLBACK)
        return False
    return True
