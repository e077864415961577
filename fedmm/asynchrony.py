"""Asynchronous buffered aggregation (FedBuff), as plain numpy: staleness weights, delay compensation, the buffer.

The server's loop (server/asynchronous.py) keeps ``concurrency`` clients
training, puts each valid reply into an ``UpdateBuffer`` with its staleness
tau (global versions applied since the client's model was sent), and applies
``buffer-size`` updates at a time:

    theta <- theta + eta_g * sum_i w_i s(tau_i) delta_i / sum_i w_i s(tau_i)

(eta_g: FedAvgM's ``server_learning_rate``; with FedAdam & co. the weighted mean
is their pseudo-gradient). ``s`` is one of FedAsync's staleness functions (Xie,
Koyejo & Gupta 2019):

- ``constant``: s = 1;
- ``polynomial a=A``: s = (tau + 1)^-A;
- ``hinge a=A b=B``: s = 1 for tau <= B, else 1 / (A (tau - B) + 1).

Delay compensation (DC-ASGD, Zheng et al. 2017) corrects a stale update for
the versions applied while it was computed. DC-ASGD approximates the gradient
at the newer point by a first-order Taylor step whose Hessian is the diagonal
of the gradient's outer product: g(theta_t) ~ g + lam * g * g * (theta_t - theta_v).
A client's update is delta = -eta g, so in update terms

    delta' = delta - lam' * delta * delta * (theta_t - theta_v),   lam' = lam / eta,

which is what ``delay_compensated`` applies (``delay-compensation`` = lam').
Fresh updates (theta_t = theta_v) are left as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

STALENESS_KINDS = ("constant", "polynomial", "hinge")
# past these, s(tau) of a few versions' staleness is below any weight that matters: (tau+1)^-10, 1/(1e6 tau + 1)
MAX_STALENESS_A = {"constant": 1.0, "polynomial": 10.0, "hinge": 1e6}
MIN_WEIGHT = 1e-12  # s(tau) never underflows to 0: a buffer of stale updates keeps a positive total weight
_PARAMETERS = {"constant": {}, "polynomial": {"a": 0.5}, "hinge": {"a": 10.0, "b": 4.0}}


@dataclass(frozen=True)
class Staleness:
    """A staleness function s(tau) in (0, 1], s(0) = 1, non-increasing."""

    kind: str = "constant"
    a: float = 0.0
    b: float = 0.0

    def weight(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness {tau} < 0")
        if self.kind == "polynomial":
            return max(MIN_WEIGHT, float((tau + 1) ** -self.a))
        if self.kind == "hinge":
            return 1.0 if tau <= self.b else max(MIN_WEIGHT, 1.0 / (self.a * (tau - self.b) + 1.0))
        return 1.0

    @property
    def spec(self) -> str:
        params = " ".join(f"{k}={getattr(self, k):g}" for k in _PARAMETERS[self.kind])
        return f"{self.kind} {params}".strip()


def parse_staleness(text: str) -> Staleness:
    """``"polynomial a=0.5"`` -> Staleness; ValueError names the part that is wrong."""
    kind, *pairs = text.split() or ["constant"]
    if kind not in STALENESS_KINDS:
        raise ValueError(f"unknown staleness function '{kind}'; one of {', '.join(STALENESS_KINDS)}")
    values = dict(_PARAMETERS[kind])
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or name not in values:
            known = ", ".join(values) or "none"
            raise ValueError(f"staleness '{kind}': unknown parameter {pair!r} (its parameters: {known})")
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"staleness '{kind}': {name} = {value!r} is not a number") from None
    a_max = MAX_STALENESS_A[kind]
    if not 0 < values.get("a", 1.0) <= a_max:
        raise ValueError(f"staleness '{kind}': a must be a number in (0, {a_max:g}] (a larger one weights every "
                         "stale update as zero)")
    if values.get("b", 0.0) < 0 or not np.isfinite(values.get("b", 0.0)):
        raise ValueError(f"staleness '{kind}': b must be a finite number >= 0")
    return Staleness(kind, **values)


def delay_compensated(delta: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
                      trained_on: Mapping[str, np.ndarray], lam: float) -> OrderedDict[str, np.ndarray]:
    """DC-ASGD's first-order correction of ``delta`` (computed at ``trained_on``) to the ``current`` model,
    held to the uncorrected update's norm: the correction turns an update, it never lengthens it (so a norm
    bound or a clipping norm applied before it still holds after it); a correction that is not finite
    (an update of huge entries squared) leaves the update as it was."""
    if lam == 0:
        return OrderedDict(delta)
    with np.errstate(over="ignore", invalid="ignore"):
        out = OrderedDict((k, (d.astype(np.float64) - lam * d.astype(np.float64) ** 2
                               * (current[k] - trained_on[k]))) for k, d in delta.items())
    if not all(np.all(np.isfinite(v)) for v in out.values()):
        return OrderedDict(delta)
    before = float(np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values())))
    after = float(np.sqrt(sum(float(np.sum(v * v)) for v in out.values())))
    scale = before / after if after > before else 1.0
    return OrderedDict((k, (scale * v).astype(delta[k].dtype)) for k, v in out.items())


T = TypeVar("T")


@dataclass
class Arrival(Generic[T]):
    """One accepted reply: the dispatch it answers, the client, the version it trained on, its payload."""

    dispatch_id: str
    client: int
    version: int
    item: T


@dataclass
class UpdateBuffer(Generic[T]):
    """The replies waiting to be applied, each at most once.

    A reply is accepted once per dispatch (its id); a second reply to the same
    dispatch, or one to a dispatch that was never made or was abandoned, is
    refused with the reason. With ``distinct_clients`` an aggregation takes at
    most one update per client (client-level DP's sensitivity is one update
    of one client per release); a client's next update waits for the next one.
    """

    size: int
    distinct_clients: bool = False
    waiting: list[Arrival[T]] = field(default_factory=list)
    _taken: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("buffer size must be >= 1")

    def add(self, arrival: Arrival[T]) -> str | None:
        """Accept ``arrival``, or say why not (a duplicate)."""
        if arrival.dispatch_id in self._taken or any(a.dispatch_id == arrival.dispatch_id for a in self.waiting):
            return f"a second reply to dispatch {arrival.dispatch_id} (already accepted once)"
        self.waiting.append(arrival)
        return None

    def _eligible(self) -> list[Arrival[T]]:
        if not self.distinct_clients:
            return self.waiting[:self.size]
        chosen, clients = [], set()
        for arrival in self.waiting:
            if arrival.client not in clients:
                chosen.append(arrival)
                clients.add(arrival.client)
            if len(chosen) == self.size:
                break
        return chosen

    def ready(self) -> bool:
        return len(self._eligible()) >= self.size

    def take(self) -> list[Arrival[T]]:
        """The next aggregation's ``size`` updates (oldest arrivals first); they leave the buffer for good."""
        if not self.ready():
            raise RuntimeError(f"the buffer holds {len(self._eligible())} eligible updates, fewer than {self.size}")
        chosen = self._eligible()
        ids = {a.dispatch_id for a in chosen}
        self.waiting = [a for a in self.waiting if a.dispatch_id not in ids]
        self._taken |= ids
        return chosen

    def clear(self) -> list[Arrival[T]]:
        """Empty the buffer (a run that stops, or a checkpoint's view of it): what was waiting, never applied."""
        left, self.waiting = self.waiting, []
        return left
