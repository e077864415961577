"""Per-round server checkpoints, and resuming a run from the last completed round.

After every round the server writes ``<output-dir>/checkpoint/``: the global
adapter, the state of every strategy in the wrapper chain (server-optimizer
moments, constraint multipliers, the privacy accountant's ledger, codec
references, drop and failure logs), the metrics history and the RNG states
(Python's, which samples nodes, and torch's). ``resume = true`` with the same ``output-dir``
continues after the last completed round: no round is lost or repeated, and
in simulation the result equals an uninterrupted run's (tests/test_resume.py).

Every checkpoint is signed (server/signing.py: an HMAC of its files under a
key kept outside the output folder). Resuming verifies it first, so whoever can write the output folder
but not read that key cannot edit a checkpoint, nor forge one; they can still
delete it, or put back an older one this key signed (a rollback). Then the
restored privacy ledger must agree with the checkpoint: no more releases than
rounds, and exactly the releases and epsilon its round recorded.

No pickle: arrays go to safetensors, everything else to JSON. A strategy's
state is its attributes of data types (numbers, strings, NumPy arrays,
ArrayRecords, and dicts, lists and tuples of them) plus any attribute with
``state_dict()`` / ``load_state_dict()`` (Flower's accountants). Attributes of
other types (callables, codecs, config objects) are rebuilt from the run
config, which must therefore be the one the checkpoint was written with.
"""

from __future__ import annotations

import json
import math
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
from server.signing import sign, verify
from strategies import wrapper_chain
from fedmm.protocol import to_numpy, to_record
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
    levels: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
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


_SCALARS = (bool, int, float, str, type(None))


def _restored(level: Strategy, name: str, value: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    """The saved ``value`` of ``level.name``, checked against the freshly built chain; ConfigError if altered.

    A scalar attribute of the fresh chain (noise multiplier, clipping norm,
    learning rates, codec seed, ...) is set from the run config: the saved one
    must be equal. A structured one (moments, references, logs) must keep its
    type. Either way a mismatch means a corrupt or edited checkpoint.
    """
    if not hasattr(level, name):
        raise ConfigError(f"{where}: field '{name}' is not an attribute of this run's {type(level).__name__}")
    fresh = getattr(level, name)
    try:
        decoded = _decode(value, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: field '{name}' does not decode ({type(exc).__name__}: {exc})") from exc
    if isinstance(fresh, _SCALARS) and fresh is not None:
        if type(decoded) is not type(fresh) or decoded != fresh:
            raise ConfigError(f"{where}: field '{name}' = {decoded!r}, but this run's config gives {fresh!r}; "
                              "the checkpoint is corrupt or was altered")
    elif fresh is not None and not isinstance(decoded, type(fresh)) and not (
            isinstance(fresh, dict) and isinstance(decoded, dict)):
        raise ConfigError(f"{where}: field '{name}' is a {type(decoded).__name__}, expected a "
                          f"{type(fresh).__name__}; the checkpoint is corrupt or was altered")
    return decoded


def load_strategy_state(strategy: Strategy, levels: list[dict[str, Any]], arrays: dict[str, np.ndarray],
                        where: str = "checkpoint") -> None:
    """Restore what ``strategy_state`` saved into a freshly built strategy of the same chain.

    Every field is checked first (``_restored``): nothing is set unless all of
    them pass, so a refused checkpoint leaves the fresh chain untouched.
    """
    chain = list(wrapper_chain(strategy))
    names = [type(s).__qualname__ for s in chain]
    try:
        saved = [level["class"] for level in levels]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: the strategy state is malformed ({exc})") from exc
    if names != saved:
        raise ConfigError(f"resume: the checkpoint's strategy chain {saved} differs from this run's {names}")
    plan = []
    for level, state in zip(chain, levels):
        attrs = state.get("attrs") if isinstance(state, dict) else None
        if not isinstance(attrs, dict):
            raise ConfigError(f"{where}: {type(level).__name__} has no 'attrs' object")
        for name, value in attrs.items():
            field = f"{where}: {type(level).__name__}"
            if isinstance(value, dict) and "$state" in value:
                if not hasattr(getattr(level, name, None), "load_state_dict"):
                    raise ConfigError(f"{field}: field '{name}' has no state to restore in this run")
                plan.append((level, name, value["$state"], True, field))
            else:
                plan.append((level, name, _restored(level, name, value, arrays, field), False, field))
    for level, name, value, stateful, field in plan:
        if stateful:
            try:  # Flower's accountant refuses a state whose privacy config differs from its own
                getattr(level, name).load_state_dict(value)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{field}: field '{name}' is refused: {exc}") from exc
        else:
            setattr(level, name, value)


RELEASES = "privacy/releases"  # the history's per-round record of the ledger (server/recording.py)
EPSILON = "privacy/epsilon"


def check_ledger(spent: Any, server_round: int, history: dict[int, dict[str, Any]], where: str) -> None:
    """The restored privacy ledger (``privacy_spent()``'s result, None without one) against the checkpoint:
    at most one release per round, and the releases and epsilon the checkpoint's round recorded."""
    if spent is None:
        return
    row = history.get(server_round, {})
    if spent.num_releases > server_round:
        raise ConfigError(f"{where}: the privacy ledger holds {spent.num_releases} releases after "
                          f"{server_round} rounds; the checkpoint is corrupt or was altered")
    recorded = row.get(RELEASES)
    if recorded is not None and spent.num_releases != recorded:
        raise ConfigError(f"{where}: the privacy ledger holds {spent.num_releases} releases, round "
                          f"{server_round} recorded {recorded:g}; the checkpoint is corrupt or was altered")
    epsilon = row.get(EPSILON)
    if epsilon is not None and not math.isclose(spent.epsilon, epsilon, rel_tol=1e-6, abs_tol=1e-9):
        raise ConfigError(f"{where}: the privacy ledger gives epsilon {spent.epsilon:.6g}, round {server_round} "
                          f"recorded {epsilon:.6g}; the checkpoint is corrupt or was altered")


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
    state_file: Path | None = None  # where the JSON state came from (named in errors)

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
    sign(folder, settings)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(json.dumps({"folder": folder.name, "server-round": server_round}))
    os.replace(tmp, root / LATEST)  # atomic: a kill leaves the previous or the new checkpoint, never half of one
    for old in root.glob("round-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(out: Path, settings: Settings) -> Checkpoint | None:
    """The last completed round's checkpoint in ``out``, or None when there is none; its signature is checked
    (the key: ``settings``' cache dir) before anything in it is read."""
    latest = out / CHECKPOINT_DIR / LATEST
    if not latest.is_file():
        return None
    name = _read_json(latest).get("folder")
    if not isinstance(name, str) or not name.startswith("round-") or "/" in name or "\\" in name:
        raise ConfigError(f"checkpoint {latest}: field 'folder' = {name!r} is not a round folder")
    folder = out / CHECKPOINT_DIR / name
    state_file = folder / "state.json"
    verify(folder, settings)
    state = _read_json(state_file)
    try:
        checkpoint = Checkpoint(
            server_round=int(state["server-round"]),
            arrays=to_record(OrderedDict(_read_arrays(folder / "adapter.safetensors"))),
            run_config=dict(state["run-config"]),
            strategy=list(state["strategy"]),
            history=dict(state["history"]),
            rng=dict(state["rng"]),
            state_arrays=_read_arrays(folder / "state.safetensors"),
        )
    except KeyError as exc:
        raise ConfigError(f"checkpoint {state_file}: field {exc} is missing") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"checkpoint {state_file}: malformed ({exc})") from exc
    checkpoint.state_file = state_file
    return checkpoint


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"checkpoint {path}: expected a JSON object")
    return value


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise ConfigError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from exc


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
