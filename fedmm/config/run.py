"""Run-config keys of one concern: the run itself: seed, output folder, resumption, caches.
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..device import device_problem
from .declare import (
    ConfigError,
    accepts,
    key,
    non_negative,
)


@dataclass(frozen=True)
class RunSettings:
    """The run itself: seed, output folder, resumption, caches."""

    seed: int = key(0, "seed of everything random in the run", non_negative)
    output_dir: str = key("", "report folder; empty = ./runs/<timestamp> under fedmm run, ~/fedmm-runs/<timestamp> "
                                "under a bare flwr run")
    resume: bool = key(False, "continue the run in output-dir after its last completed round (its checkpoint); "
                              "the run config must be the checkpoint's, num-server-rounds and round-timeout aside")
    cache_dir: str = key("", "base-checkpoint cache; empty = $XDG_CACHE_HOME/fedmm or ~/.cache/fedmm")
    device: str = key(
        "auto", "where models compute: auto (CUDA when torch sees a device, else the CPU) | cpu | cuda | cuda:N; "
                "the server resolves it on its machine before any client is contacted, and a site's node config "
                "'device' overrides it there", accepts("auto | cpu | cuda | cuda:N")(device_problem))

    def _check_run(self) -> None:
        if self.resume and not self.output_dir:
            raise ConfigError("run-config 'resume' = true needs 'output-dir': the folder of the run to continue")

    @property
    def cache_path(self) -> Path:
        """The base-checkpoint cache: the one setting read from the environment (XDG's convention)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "fedmm"
