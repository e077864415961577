"""Methods with a client half: the interface a method's client component implements, and where it is found.

A method is a server strategy (entry-point group ``fedmm.strategies``) plus,
when the method asks more of clients than FedAvg does, a client component
registered under the same name in ``fedmm.client_methods``. The run config's
``strategy`` selects both. The ClientApp builds the component for each
message it handles (``client_method``) and calls it at fixed points of its
round (clients/app.py):

1. ``begin``: the global adapter is loaded; read the method's fields from
   the instruction, the node's state (``load``), and the arrays the global
   record carries beside the adapter;
2. ``loss_terms``: terms added to the local loss (they must not read the
   batch: under DP-SGD they are added after clipping and noise);
3. ``reply_arrays``: after local training, the arrays the reply carries
   beside the adapter (each named ``<adapter key><ARRAY_SUFFIX>``);
4. ``after_reply``: the reply is fixed; train what never leaves the client
   (a personal model), ``store`` state;
5. ``evaluate``: extra metrics of an evaluate reply (``personal-*``:
   evaluated with parameters that never leave the client).

What a component declares (class attributes) is what the server checks
before any client is contacted (server/chain.py: ``check_method``): whether
the replies carry a second update-sized vector (then it rides inside the
update: through the codec, the clipping and noise, and secure aggregation's
sum), whether it keeps a personal model, and which run settings it supports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from peft import PeftModel
from torch import nn

from .. import protocol

GROUP = "fedmm.client_methods"

# the node's own model, evaluated by the ClientApp as it evaluates the global one: metric name -> value
Evaluate = Callable[[], dict[str, float]]
LossTerm = Callable[[nn.Module, dict[str, torch.Tensor], Any], torch.Tensor]


class ClientMethod:
    """The client half of a method. One instance per message; state across rounds goes through ``store``/``load``.

    Subclasses set the declarations and override the hooks they need; the defaults are FedAvg's client.
    """

    name: ClassVar[str] = ""
    # arrays the global record and each reply carry beside the adapter: one per adapter array, same shape, keyed
    # '<adapter key><array_suffix>'; '' = none. They ride inside the update (codec, DP clipping, secure sum).
    array_suffix: ClassVar[str] = ""
    personal: ClassVar[bool] = False  # keeps parameters that never leave the client; evaluate replies: personal-*
    asynchronous: ClassVar[str] = ""  # why the method does not work under asynchronous aggregation ('' = it does)
    rank_tiers: ClassVar[str] = ""  # why it does not work with tiers of different ranks or layers ('' = it does)
    dp_sgd: ClassVar[str] = ""  # why its local work cannot run under DP-SGD ('' = it can)
    plain_sgd: ClassVar[bool] = False  # its update rule assumes local-optimizer = 'sgd'

    def __init__(self, config: Mapping[str, Any], state: RecordDict, lr: float, steps: int) -> None:
        self.config, self.state, self.lr, self.steps = config, state, lr, steps

    # --- hooks, in the order the ClientApp calls them
    def begin(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray]) -> None:
        """The global adapter is in ``net``; ``global_arrays`` is the whole global record (the method's arrays too)."""

    def loss_terms(self, net: PeftModel) -> list[LossTerm]:
        return []

    def reply_arrays(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray],
                     steps_done: int) -> dict[str, np.ndarray]:
        """Arrays the reply carries beside the trained adapter (keys ending with ``array_suffix``)."""
        return {}

    def after_reply(self, net: PeftModel, global_arrays: Mapping[str, np.ndarray],
                    train: Callable[[list[LossTerm]], None]) -> None:
        """After the reply is built: ``train(terms)`` runs the round's local steps again with extra terms."""

    def evaluate(self, net: PeftModel, evaluate: Evaluate) -> dict[str, float]:
        """Extra evaluate metrics (``personal-<metric>``)."""
        return {}

    # --- the node's own state (Flower's Context.state: kept across rounds, never sent)
    def load(self, key: str) -> dict[str, np.ndarray] | None:
        record = self.state.get(_state_key(self.name, key))
        if not isinstance(record, ArrayRecord):
            return None
        return {k: v.numpy() for k, v in record.items()}

    def store(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.state[_state_key(self.name, key)] = protocol.to_record(arrays)


def _state_key(method: str, key: str) -> str:
    return f"method:{method}:{key}"


def available() -> dict[str, Any]:
    """name -> entry point of every installed client half."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def method_class(name: str) -> type[ClientMethod]:
    """The client half of strategy ``name`` (FedAvg's, ``ClientMethod`` itself, when it has none)."""
    found = available()
    if name not in found:
        return ClientMethod
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, ClientMethod)):
        raise TypeError(f"client method '{name}' ({found[name].value}) is not a fedmm.methods.ClientMethod subclass")
    return cls


def method_arrays(arrays: Mapping[str, np.ndarray], suffix: str) -> dict[str, np.ndarray]:
    """The method's arrays of a record (keys ending with ``suffix``), by their adapter key."""
    return {k.removesuffix(suffix): v for k, v in arrays.items() if suffix and k.endswith(suffix)}


def adapter_parameters(net: PeftModel) -> dict[str, nn.Parameter]:
    """The trainable LoRA parameters by their adapter key (peft's state-dict name: no adapter name)."""
    return {name.replace(".default.", "."): p for name, p in net.named_parameters()
            if p.requires_grad and (protocol.A_SUFFIX.split(".")[1] in name or protocol.B_SUFFIX.split(".")[1] in name)}


@runtime_checkable
class CarriesMethodArrays(Protocol):
    """A server half whose global record carries the method's arrays beside the adapter (SCAFFOLD's c)."""

    def with_method_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The initial global record: the adapter and the method's arrays."""
        ...


def composition_problem(name: str, strategy: type, settings: Any) -> str | None:
    """Why method ``name`` (the strategy class and its client half) cannot run with ``settings``, or None.

    Checked by ``fedmm run`` and the ServerApp before any client is contacted. What is not refused here holds
    by construction: a method's arrays ride inside the update (the codec encodes them, DP clips and noises them
    with it, secure aggregation sums them), and a personal model never leaves the client.
    """
    method = method_class(name)
    key = f"run-config 'strategy' = '{name}'"
    if method.array_suffix and not callable(getattr(strategy, "with_method_arrays", None)):
        return (f"{key}: its client half replies with arrays '*{method.array_suffix}' that its server half does not "
                "put in the global record (with_method_arrays)")
    if method.array_suffix and not method.array_suffix.startswith(protocol.METHOD_ARRAY):
        return f"{key}: its arrays' suffix '{method.array_suffix}' must start with '{protocol.METHOD_ARRAY}'"
    if method.asynchronous and settings.asynchronous:
        return f"{key} with 'asynchronous' = true: {method.asynchronous}"
    if method.rank_tiers and not settings.rank_plan.one_shape:
        return f"{key} with tiers of different LoRA ranks or layers ('client-profiles'): {method.rank_tiers}"
    if method.dp_sgd and settings.dp == "dp-sgd":
        return f"{key} with 'dp' = 'dp-sgd': {method.dp_sgd}"
    if method.plain_sgd and settings.local_optimizer != "sgd":
        return (f"{key} with 'local-optimizer' = '{settings.local_optimizer}': its update rule assumes clients run "
                "plain SGD; set local-optimizer='sgd' (and an SGD step, e.g. lr=0.05)")
    return None
