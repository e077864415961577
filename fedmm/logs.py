"""The root logger of fedmm's app processes: no handler of its own, so every record is printed once.

Flower's logger prints its records with its own handler and also hands them
to the root logger. Libraries configure the root logger on import: Opacus
calls ``logging.basicConfig`` with a timestamped stderr handler, and
open_clip's ``logging.info()`` calls it when the root has no handler. Either
way each Flower line came out twice. ``quiet_root_logger`` removes the
handlers ``basicConfig`` installs (plain ``StreamHandler``s; test harnesses'
subclasses stay) and leaves a ``NullHandler``, so later ``basicConfig`` calls
do nothing.
"""

from __future__ import annotations

import logging


def quiet_root_logger() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())
