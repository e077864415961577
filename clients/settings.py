"""The run's settings in a ClientApp process, validated once per run config (fedmm.config)."""

from __future__ import annotations

import functools

from flwr.app import Context

from fedmm.config import Settings


@functools.lru_cache(maxsize=4)
def _settings(run_config: tuple) -> Settings:
    # the server's own manifests need not exist here: a site never opens them
    return Settings.from_run_config(dict(run_config), server_files=False)


def run_settings(context: Context) -> Settings:
    """The settings of the run this message belongs to (cached: one validation per run and process)."""
    return _settings(tuple(sorted(context.run_config.items())))
