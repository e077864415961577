"""Where a process computes: the run-config key ``device`` (or a site's node config ``device``), resolved once.

``auto`` is CUDA when torch sees a CUDA device, else the CPU; ``cpu``,
``cuda`` and ``cuda:N`` name one. ``device_problem`` says what is wrong with
a spec before anything is built (the run config's check, a site's node
config); ``resolve_device`` turns a spec into the ``torch.device`` this
process has, or fails naming what it lacks.

Client training (DP-SGD included) and evaluation and the server's central
evaluation run on the resolved device; the base is pretrained on the CPU
(``fedmm/pretrain.py``: every node must get it bit for bit). Batches are built on the CPU (a manifest's images decode
there) and move once per step (``Batch.to``: pinned, non-blocking on CUDA);
what crosses the wire stays numpy on the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .protocol import NODE_DEVICE

if TYPE_CHECKING:  # torch loads where a device is resolved, not where a run config is checked
    import torch
    from torch import nn

DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceUnavailable(ValueError):
    """A device spec this machine cannot honour (malformed, or naming hardware torch does not see)."""


def device_problem(spec: str) -> str | None:
    """Why ``spec`` is not a device spec (``auto``, ``cpu``, ``cuda`` or ``cuda:N``), or None."""
    if not isinstance(spec, str) or not DEVICE_SPEC.match(spec.strip()):
        return "must be auto, cpu, cuda or cuda:N"
    return None


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters are on (the CPU for a model without parameters)."""
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def resolve_device(spec: str) -> torch.device:
    """The ``torch.device`` ``spec`` names on this machine; ``DeviceUnavailable`` when it is malformed or absent."""
    import torch

    problem = device_problem(spec)
    if problem:
        raise DeviceUnavailable(f"device {spec!r}: {problem}")
    spec = spec.strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {spec!r}: torch sees no CUDA device on this machine"
                         + ("" if torch.backends.cuda.is_built() else " (this torch was built without CUDA)"))
    index = int(spec.split(":")[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailable(f"device {spec!r}: torch sees {count} CUDA device(s) on this machine (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def node_device(node_config: Mapping[str, Any], run_device: str) -> torch.device:
    """A node's device: its node config's ``device`` where the site set one, else the run config's.

    ``DeviceUnavailable`` names the key that asked for what this machine lacks.
    """
    own = node_config.get(NODE_DEVICE)
    key, spec = (f"node config '{NODE_DEVICE}'", str(own)) if own else ("run-config 'device'", run_device)
    try:
        return resolve_device(spec)
    except DeviceUnavailable as exc:
        hint = "" if own else f"; a site sets its own with node config '{NODE_DEVICE}'"
        raise DeviceUnavailable(f"{key} = {spec!r}: {exc}{hint}") from exc
