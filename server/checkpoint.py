"""Per-round server checkpoints, and resuming a run from the last completed round.

After every round the server writes ``<output-dir>/checkpoint/``: the global
adapter, the state of every strategy in the wrapper chain (server-optimizer
moments, constraint multipliers, the privacy accountant's ledger, codec
references, drop and failure logs), the metrics history and the RNG states
(Python's, which samples nodes, and torch's). ``resume = true`` with the same ``output-dir``
continues after the last completed round: no round is lost or repeated, and
in simulation the result equals an uninterrupted run's (tests/test_resume.py).

No pickle: arrays go to safetensors, everything else to JSON. A strategy's
state is its attributes of data types (numbers, strings, NumPy arrays,
ArrayRecords, and dicts, lists and tuples of them) plus any attribute with
``state_dict()`` / ``load_state_dict()`` (Flower's accountants). Attributes of
other types (callables, codecs, config objects) are rebuilt from the run
config, which must therefore be the one the checkpoint was written with.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors.numpy import load_file, save_file

from fedmm.config import ConfigError, Settings
from strategies import wrapper_chain
from strategies.records import to_numpy, to_record
from strategies.wrapper import StrategyWrapper

CHECKPOINT_DIR = "checkpoint"
LATEST = "latest.json"
# Keys a resumed run may change: more rounds, a longer wait.
RESUMABLE_CHANGES = frozenset({"num-server-rounds", "round-timeout", "resume"})


class _Unsupported(Exception):
    """A value outside the checkpoint's data types: the attribute is rebuilt from the config instead."""


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise _Unsupported(path)
        arrays[path] = np.ascontiguousarray(value)
        return {"$array": path}
    if isinstance(value, ArrayRecord):
        return {"$arrayrecord": _encode(OrderedDict(to_numpy(value)), path, arrays)}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise _Unsupported(path)
        tag = "$odict" if isinstance(value, OrderedDict) else "$dict"
        return {tag: [[k, _encode(v, f"{path}/{k}", arrays)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]
        return {"$tuple" if isinstance(value, tuple) else "$list": items}
    raise _Unsupported(path)


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "$array":
        return arrays[body]
    if tag == "$arrayrecord":
        return to_record(_decode(body, arrays))
    if tag in ("$dict", "$odict"):
        pairs = [(k, _decode(v, arrays)) for k, v in body]
        return OrderedDict(pairs) if tag == "$odict" else dict(pairs)
    if tag == "$list":
        return [_decode(v, arrays) for v in body]
    if tag == "$tuple":
        return tuple(_decode(v, arrays) for v in body)
    raise ValueError(f"checkpoint: unknown value tag {tag!r}")


def strategy_state(strategy: Strategy) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Each strategy's state in the chain (outermost first) as JSON, and the arrays it refers to."""
    levels, arrays = [], {}
    for depth, level in enumerate(wrapper_chain(strategy)):
        attrs: dict[str, Any] = {}
        for name, value in vars(level).items():
            if name == "strategy" or callable(value) and not hasattr(value, "state_dict"):
                continue
            if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
                attrs[name] = {"$state": value.state_dict()}
                continue
            try:
                attrs[name] = _encode(value, f"{depth}/{name}", arrays)
            except _Unsupported:
                continue
        levels.append({"class": type(level).__qualname__, "attrs": attrs})
    return levels, arrays


def load_strategy_state(strategy: Strategy, levels: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> None:
    """Restore what ``strategy_state`` saved into a freshly built strategy of the same chain."""
    chain = list(wrapper_chain(strategy))
    names = [type(s).__qualname__ for s in chain]
    saved = [level["class"] for level in levels]
    if names != saved:
        raise ConfigError(f"resume: the checkpoint's strategy chain {saved} differs from this run's {names}")
    for level, state in zip(chain, levels):
        for name, value in state["attrs"].items():
            if isinstance(value, dict) and "$state" in value:
                getattr(level, name).load_state_dict(value["$state"])
            else:
                setattr(level, name, _decode(value, arrays))


def rng_state() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Python's RNG (Flower's node sampling) and torch's. NumPy's global RNG is left out on purpose:
    Flower's DP wrappers draw their noise from it, and noise must not be replayable from a file."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss]}, {"rng/torch": torch.get_rng_state().numpy()}


def load_rng_state(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.from_numpy(arrays["rng/torch"].copy()))


@dataclass
class Checkpoint:
    """The server's state at the end of round ``server_round``."""

    server_round: int
    arrays: ArrayRecord  # the global adapter
    run_config: dict[str, Any]
    strategy: list[dict[str, Any]]
    history: dict[str, Any]
    rng: dict[str, Any]
    state_arrays: dict[str, np.ndarray]  # strategy and RNG arrays

    def check_config(self, settings: Settings) -> None:
        """Refuse to resume under a different run config (only ``RESUMABLE_CHANGES`` may differ)."""
        now = settings.to_run_config()
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and self.run_config.get(k) != now[k])
        if changed:
            shown = ", ".join(f"'{k}' ({self.run_config.get(k)!r} -> {now[k]!r})" for k in changed)
            raise ConfigError(f"resume: run config differs from the checkpoint's in {shown}; "
                              f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change")
        if settings.num_server_rounds < self.server_round:
            raise ConfigError(f"resume: 'num-server-rounds' = {settings.num_server_rounds} but the checkpoint "
                              f"already completed round {self.server_round}")


def save_checkpoint(out: Path, server_round: int, arrays: ArrayRecord, strategy: Strategy,
                    history: dict[str, Any], settings: Settings) -> Path:
    """Write round ``server_round``'s checkpoint; ``latest.json`` moves to it only once it is complete."""
    root = out / CHECKPOINT_DIR
    folder = root / f"round-{server_round:05d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    levels, state_arrays = strategy_state(strategy)
    rng, rng_arrays = rng_state()
    save_file(dict(to_numpy(arrays)), str(folder / "adapter.safetensors"))
    save_file({**state_arrays, **rng_arrays}, str(folder / "state.safetensors"))
    state = {"server-round": server_round, "run-config": settings.to_run_config(),
             "strategy": levels, "history": history, "rng": rng}
    (folder / "state.json").write_text(json.dumps(state))
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(json.dumps({"folder": folder.name, "server-round": server_round}))
    os.replace(tmp, root / LATEST)  # atomic: a kill leaves the previous or the new checkpoint, never half of one
    for old in root.glob("round-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(out: Path) -> Checkpoint | None:
    """The last completed round's checkpoint in ``out``, or None when there is none."""
    latest = out / CHECKPOINT_DIR / LATEST
    if not latest.is_file():
        return None
    folder = out / CHECKPOINT_DIR / json.loads(latest.read_text())["folder"]
    state = json.loads((folder / "state.json").read_text())
    return Checkpoint(
        server_round=int(state["server-round"]),
        arrays=to_record(OrderedDict(load_file(str(folder / "adapter.safetensors")))),
        run_config=state["run-config"],
        strategy=state["strategy"],
        history=state["history"],
        rng=state["rng"],
        state_arrays=load_file(str(folder / "state.safetensors")),
    )


class ResumedRounds(StrategyWrapper):
    """Runs ``Strategy.start``'s rounds 1..n as rounds ``done``+1..``done``+n of the resumed run.

    Clients see the true round number (their seeds and fault draws depend on
    it), and so do the wrapped strategies' per-round records.
    """

    def __init__(self, strategy: Strategy, done: int) -> None:
        super().__init__(strategy)
        self.done = done

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)
