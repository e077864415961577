"""The run config as text: Flower's ``k=v k2='s'`` syntax (``flwr run --run-config``), both ways."""

from __future__ import annotations

from .declare import ConfigError


def parse_run_config(text: str) -> dict:
    """``"k=v k2='s'"`` -> dict, with Flower's own parser (the ``flwr run --run-config`` syntax)."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([text]) if text.strip() else {}
    except click.ClickException as exc:
        raise ConfigError(f"--run-config {text!r}: {exc.message}") from exc


def format_run_config(values: dict) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace('"', '\\"') + '"'
        return repr(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in values.items())
