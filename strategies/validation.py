"""UpdateValidation: every training reply checked before the wrapped strategy aggregates it.

Client obligation: none beyond the wrapped strategy's: reply with the
trainable adapter arrays under the strategy's ``arrayrecord_key``.

Precondition: the replies it sees have the global's trainable arrays exactly
(names, shapes, float32). In fedmm's chain ``CompressedUpdates`` guarantees
it: it decodes each payload against the global adapter's layout — the codec
checks every payload array's name, dtype and length there, where a malformed
reply can actually be caught — and rebuilds the arrays from that layout; a
payload that does not decode is dropped there with its reason.

A reply is dropped, with its reason logged and kept in ``drops``, when any
value is NaN or infinite (a payload can decode to that: huge quantization
scales overflow float32), or when its update norm
||local - global|| is absurd: more than ``max_norm_ratio`` times the median
norm of the round's replies (a round of fewer than three also counts the
last accepted updates' norms: a median of one or two is the attacker's to
move). With ``norm_bound`` > 0 every kept update is
clipped to that norm first (norm bounding, Sun et al. 2019: it caps what one
scaled or boosted update can do to the mean without dropping anybody).
Error replies pass through untouched: the wrapped strategy counts them as
failures. The round goes on with what is left; if that is fewer than the
strategy's minimum, the strategy decides, as for any missing reply.

With ``keep_every_reply`` (central DP, ``fedmm.privacy.plan.
release_independent_of_one_client``) no update is dropped, since a missing
one would void the accounted release: the ratio rule is off, and a
non-finite update enters as a zero update (the global unchanged), counted as
``zeroed-updates`` and logged with its reason.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedmm.protocol import arrays_in, to_numpy, to_record, trainable
from strategies.wrapper import StrategyWrapper


RECENT_NORMS = 16


def finiteness_problem(local: dict[str, np.ndarray]) -> str | None:
    """Which array of ``local`` holds NaN or infinite values, or None."""
    for name, arr in local.items():
        if not np.all(np.isfinite(arr)):
            return f"'{name}' has NaN or infinite values"
    return None


def _one_ulp_off(ref: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """``ref`` with its first value moved one float step up: an update of the smallest non-zero norm."""
    out = OrderedDict((k, v.copy()) for k, v in ref.items())
    first = next(iter(out.values())).reshape(-1)
    first[0] = np.nextafter(first[0], np.inf, dtype=first.dtype)
    return out


class UpdateValidation(StrategyWrapper):
    def __init__(self, strategy: Strategy, max_norm_ratio: float = 10.0, norm_bound: float = 0.0,
                 keep_every_reply: bool = False) -> None:
        super().__init__(strategy)
        if max_norm_ratio < 0 or norm_bound < 0:
            raise ValueError("UpdateValidation: max_norm_ratio and norm_bound must be >= 0 (0 = off)")
        self.max_norm_ratio = 0.0 if keep_every_reply else max_norm_ratio
        self.norm_bound, self.keep_every_reply = norm_bound, keep_every_reply
        self.key = self.arrays_key
        self._reference: OrderedDict[str, np.ndarray] | None = None
        self.stats: dict[int, dict[str, float]] = {}
        self.drops: list[dict[str, object]] = []  # round, node, reason of every dropped update
        self.recent_norms: list[float] = []  # the last accepted updates' norms, for rounds of too few peers

    def round_stats(self, server_round: int) -> dict[str, float]:
        return {f"validation/{k}": v for k, v in self.stats.get(server_round, {}).items()}

    def summary(self) -> None:
        log(INFO, "\t├──> UpdateValidation: drop malformed or non-finite updates, and norms > %s x the median; "
            "norm bound %s", self.max_norm_ratio or "off", self.norm_bound or "off")
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = trainable(to_numpy(arrays))  # what a reply carries: never the downlink-only arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _drop(self, server_round: int, msg: Message, reason: str) -> None:
        node = msg.metadata.src_node_id
        log(WARNING, "round %d: dropped the update of node %s: %s", server_round, node, reason)
        self.drops.append({"round": server_round, "node": node, "reason": reason})
        self.stats[server_round]["dropped-updates"] += 1

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._reference is None:
            raise RuntimeError("aggregate_train before configure_train")
        ref = self._reference
        self.stats[server_round] = {"dropped-updates": 0.0, "clipped-updates": 0.0}
        if self.keep_every_reply:
            self.stats[server_round]["zeroed-updates"] = 0.0
        passed, candidates = [], []
        for msg in replies:
            if msg.has_error():
                passed.append(msg)
                continue
            try:
                local = to_numpy(arrays_in(msg.content, self.key))
            except (KeyError, TypeError, ValueError) as exc:
                self._drop(server_round, msg, f"no readable '{self.key}' record: {exc}")
                continue
            problem = finiteness_problem(local)
            if problem is not None and self.keep_every_reply:
                log(WARNING, "round %d: the update of node %s enters as a zero update: %s", server_round,
                    msg.metadata.src_node_id, problem)
                self.drops.append({"round": server_round, "node": msg.metadata.src_node_id,
                                   "reason": f"{problem}: entered as a zero update (central DP)"})
                self.stats[server_round]["zeroed-updates"] += 1
                msg.content[self.key] = to_record(OrderedDict((k, v.copy()) for k, v in ref.items()))
                local = ref
            elif problem is not None:
                self._drop(server_round, msg, problem)
                continue
            delta = OrderedDict((k, local[k] - ref[k]) for k in ref)
            norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
            if norm == 0 and self.keep_every_reply:
                # Flower's server-side clipping divides by the update's norm: an update of exactly zero would
                # raise there and end the run. One ulp on one coordinate moves the mean by less than float32
                # resolves, and keeps the client's contribution inside the clipping ball
                msg.content[self.key] = to_record(_one_ulp_off(ref))
            candidates.append((msg, delta, norm))
        # a round of fewer than three updates (an asynchronous buffer of two) is compared with the norms the
        # last rounds accepted as well: a median of one or two is the attacker's to move
        norms = [n for _, _, n in candidates]
        peers = norms if len(norms) >= 3 else norms + self.recent_norms
        median = float(np.median(peers)) if len(peers) >= 3 else None
        for msg, delta, norm in candidates:
            if self.max_norm_ratio and median is not None and norm > self.max_norm_ratio * max(median, 1e-12):
                self._drop(server_round, msg, f"update norm {norm:.4g} is more than {self.max_norm_ratio:g}x "
                                              f"the round's median {median:.4g}")
                continue
            if self.norm_bound and norm > self.norm_bound:
                scale = self.norm_bound / norm
                msg.content[self.key] = to_record(OrderedDict((k, ref[k] + scale * delta[k]) for k in ref))
                self.stats[server_round]["clipped-updates"] += 1
            passed.append(msg)
            self.recent_norms = (self.recent_norms + [norm])[-RECENT_NORMS:]
        return self.strategy.aggregate_train(server_round, passed)
