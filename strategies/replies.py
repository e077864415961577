"""ReplyCheck: every reply checked before anything on the server reads it.

Client obligation: fedmm's ClientApp. A train reply holds exactly an
ArrayRecord under ``arrays`` and a MetricRecord under ``metrics``; an
evaluate reply only the MetricRecord. Every metric is a finite int or float
scalar; ``num-examples`` is an integer in [1, MAX_EXAMPLES] (train) or
[0, MAX_EXAMPLES] (evaluate), ``unit-weight`` is 1, ``partition-id`` an
integer in [0, 2^31), and a train reply's ``lora-rank`` an integer in
[1, the global rank]. The arrays must be readable numeric arrays; their
names, dtypes and sizes are the codec's to check (``CompressedUpdates``
decodes the payload against the global adapter's layout, and drops what does
not decode). Under secure aggregation a train reply holds the client's two
public keys under ``secagg`` instead of the arrays (``SecureAggregation``
checks its later stages).

A reply that breaks any of this is dropped here, with the node, the round
and what was wrong, logged and kept in ``drops``; it never reaches the
wrapped strategies. Then the round's metric keys are made consistent (Flower's
built-in strategies raise ``InconsistentMessageReplies``, which ends the
whole run, when replies' keys differ): the round's key set is the one the
protocol expects of the run's clients (``fedmm.privacy.release.
train_metric_keys``), plus the family keys (per-group counts) that most
replies carry; a reply lacking one of its keys is dropped, and keys beyond
it are removed. Honest clients of one run all send the same keys, so their
replies pass unchanged whatever else arrives. Error replies
(crashes, declines) pass through: ``CompressedUpdates`` counts them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedmm import protocol
from fedmm.protocol import LORA_RANK as RANK_METRIC
from strategies.wrapper import StrategyWrapper

TRAIN, EVALUATE = "train", "evaluate"
MAX_KEY_BYTES = 4096  # a PEM public key of SECP384R1 is ~215 bytes


def _integer(value: float) -> bool:
    return float(value).is_integer()


def metric_problem(metrics: MetricRecord, phase: str, max_rank: int) -> str | None:
    """Why ``metrics`` is not a valid reply's MetricRecord in ``phase``, or None."""
    for key, value in metrics.items():
        if not isinstance(key, str):
            return f"metric key {key!r} is not a string"
        if type(value) not in (int, float) or not isinstance(value, (int, float)):  # no bool, no lists
            return f"metric '{key}' is {type(value).__name__}, expected an int or float scalar"
        if not math.isfinite(value) or abs(value) > protocol.MAX_METRIC_MAGNITUDE:
            return f"metric '{key}' = {value!r} is not finite or out of range"
    low = 1 if phase == TRAIN else 0
    required = [(protocol.NUM_EXAMPLES, low, protocol.MAX_EXAMPLES),
                (protocol.UNIT_WEIGHT, 1, 1),
                (protocol.PARTITION_ID, 0, protocol.MAX_PARTITION_ID)]
    if phase == TRAIN:
        required.append((RANK_METRIC, 1, max_rank))
    for key, lo, hi in required:
        if key not in metrics:
            return f"metric '{key}' is missing"
        value = metrics[key]
        if not isinstance(value, (int, float)) or not _integer(value) or not lo <= value <= hi:
            return f"metric '{key}' = {value!r} must be an integer in [{lo}, {hi}]"
    return None


def array_problem(arrays: ArrayRecord) -> str | None:
    """Why the ArrayRecord's arrays cannot even be read as numeric arrays, or None."""
    if len(arrays) == 0:
        return "the 'arrays' record is empty"
    for name, array in arrays.items():
        if not isinstance(array, Array):
            return f"'{name}' is not an array"
        try:
            value = array.numpy()
        except Exception as exc:  # noqa: BLE001 - any undecodable bytes are the sender's fault
            return f"'{name}' does not deserialize: {type(exc).__name__}: {exc}"
        if value.dtype.kind not in "biuf":
            return f"'{name}' has dtype {value.dtype}, not a numeric type"
    return None


def keys_problem(record: object) -> str | None:
    """Why a secure-aggregation train reply's record is not two public keys, or None."""
    if not isinstance(record, ConfigRecord):
        return f"'{protocol.SECAGG}' holds a {type(record).__name__}, expected a ConfigRecord"
    if set(record) != {protocol.SA_C_KEY, protocol.SA_S_KEY} or not all(
            isinstance(v, bytes) and 0 < len(v) <= MAX_KEY_BYTES for v in record.values()):
        return f"'{protocol.SECAGG}' must hold exactly two public keys ({protocol.SA_C_KEY}, {protocol.SA_S_KEY})"
    return None


def reply_problem(msg: Message, phase: str, max_rank: int, secure_aggregation: bool = False) -> str | None:
    """Why ``msg`` is not a well-formed ``phase`` reply, or None. Never raises. Under secure aggregation a
    train reply carries the client's public keys (``secagg``) instead of its update."""
    try:
        content = msg.content
        payload = protocol.SECAGG if secure_aggregation else protocol.ARRAYS
        expected = {payload, protocol.METRICS} if phase == TRAIN else {protocol.METRICS}
        keys = set(content.keys())
        if keys != expected:
            return f"records {sorted(map(str, keys))}, expected {sorted(expected)}"
        metrics = content[protocol.METRICS]
        if not isinstance(metrics, MetricRecord):
            return f"'{protocol.METRICS}' holds a {type(metrics).__name__}, expected a MetricRecord"
        if phase == TRAIN and secure_aggregation:
            problem = keys_problem(content[protocol.SECAGG])
            if problem:
                return problem
        elif phase == TRAIN:
            arrays = content[protocol.ARRAYS]
            if not isinstance(arrays, ArrayRecord):
                return f"'{protocol.ARRAYS}' holds a {type(arrays).__name__}, expected an ArrayRecord"
            problem = array_problem(arrays)
            if problem:
                return problem
        return metric_problem(metrics, phase, max_rank)
    except Exception as exc:  # noqa: BLE001 - a reply that cannot even be inspected is malformed
        return f"unreadable reply: {type(exc).__name__}: {exc}"


def round_key_set(replies: list[Message], expected: frozenset[str], families: tuple[str, ...]) -> frozenset[str]:
    """The round's metric keys: ``expected`` (the protocol's keys for the run), plus each key of a family (a
    prefix whose names depend on the run's groups and classes) that more than half of the valid replies
    carry."""
    counts = Counter(k for msg in replies for k in msg.content[protocol.METRICS].keys()
                     if k.startswith(families) and k not in expected)
    return expected | {k for k, n in counts.items() if 2 * n > len(replies)}


class ReplyCheck(StrategyWrapper):
    """Drops malformed train and evaluate replies, and makes the round's metric keys consistent.

    ``expected``: per phase, the metric keys every honest reply carries and the key families
    (``fedmm.privacy.release``); the round's keys are then the protocol's, not a vote, so one reply with an
    extra or a missing key cannot get honest replies dropped, whatever the number of replies (the
    asynchronous loop checks them one at a time)."""

    def __init__(self, strategy: Strategy, max_rank: int, secure_aggregation: bool,
                 expected: dict[str, tuple[frozenset[str], tuple[str, ...]]]) -> None:
        super().__init__(strategy)
        self.max_rank, self.secure_aggregation = max_rank, secure_aggregation
        self.expected = expected
        self.drops: list[dict[str, object]] = []  # round, phase, node, reason of every rejected reply
        self.stats: dict[int, dict[str, float]] = {}  # round -> rejected-replies (train and evaluate)

    def round_stats(self, server_round: int) -> dict[str, float]:
        return dict(self.stats.get(server_round, {}))

    def summary(self) -> None:
        log(INFO, "\t├──> ReplyCheck: malformed replies dropped, metric keys made consistent")
        self.strategy.summary()

    def _drop(self, server_round: int, phase: str, msg: Message, reason: str) -> None:
        node = msg.metadata.src_node_id
        log(WARNING, "round %d: dropped the %s reply of node %s: %s", server_round, phase, node, reason)
        self.drops.append({"round": server_round, "phase": phase, "node": node, "reason": reason})
        stats = self.stats.setdefault(server_round, {})
        stats[f"rejected-{phase}-replies"] = stats.get(f"rejected-{phase}-replies", 0.0) + 1

    def check(self, server_round: int, phase: str, replies: Iterable[Message]) -> list[Message]:
        """The replies fit to pass on: error replies, and valid replies with the round's metric keys."""
        self.stats.setdefault(server_round, {}).setdefault(f"rejected-{phase}-replies", 0.0)
        errors, valid = [], []
        for msg in replies:
            if not isinstance(msg, Message):
                log(WARNING, "round %d: dropped a %s reply that is not a Message (%s)",
                    server_round, phase, type(msg).__name__)
                continue
            try:
                failed = msg.has_error()
            except Exception:  # noqa: BLE001
                failed = False  # reply_problem names what is wrong
            if failed:
                errors.append(msg)
                continue
            problem = reply_problem(msg, phase, self.max_rank, self.secure_aggregation and phase == TRAIN)
            if problem:
                self._drop(server_round, phase, msg, problem)
            else:
                valid.append(msg)
        if not valid:
            return errors
        keys = round_key_set(valid, *self.expected[phase])
        kept = []
        for msg in valid:
            metrics = protocol.metrics_in(msg.content)
            missing = keys - set(metrics.keys())
            if missing:
                self._drop(server_round, phase, msg, f"metric keys {sorted(missing)} missing (the round's "
                                                     f"replies carry {sorted(keys)})")
                continue
            for extra in set(metrics.keys()) - keys:
                del metrics[extra]
            kept.append(msg)
        return errors + kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self.check(server_round, TRAIN, replies))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, self.check(server_round, EVALUATE, replies))


__all__ = ["ReplyCheck", "reply_problem", "metric_problem", "array_problem", "round_key_set"]
