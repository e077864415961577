"""ReplyBook: which replies failed or never came, and the order every later wrapper sees them in.

No client obligation beyond the protocol's ``partition-id`` metric. Per round it
counts the sampled nodes that did not reply in time (``missing-replies``) and
the error replies (crashes, declines: ``failed-replies``, each kept in
``failures`` with its node and reason, for the report), and hands the replies
on in partition order (``in_partition_order``): float sums depend on their
order, arrival order changes from run to run, and so do node ids in
simulation; partition ids do not, so one seed and one config give the same
model and metrics, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedmm import protocol
from strategies.wrapper import StrategyWrapper


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by the ``partition-id`` in their metrics (then node id; errors first)."""
    def key(msg: Message) -> tuple[int, int]:
        node = msg.metadata.src_node_id
        try:
            if msg.has_error() or protocol.METRICS not in msg.content:
                return -1, node
            return protocol.integer(protocol.metrics_in(msg.content), protocol.PARTITION_ID, -1), node
        except (TypeError, ValueError, OverflowError, AttributeError):
            return -1, node  # not an integer: malformed replies sort first (ReplyCheck drops them earlier)

    return sorted(replies, key=key)


class ReplyBook(StrategyWrapper):
    def __init__(self, strategy) -> None:
        super().__init__(strategy)
        self.stats: dict[int, dict[str, float]] = {}  # round -> failed and missing replies
        self.failures: list[dict[str, object]] = []  # error replies (crashes, declines), with their reasons

    def round_stats(self, server_round: int) -> dict[str, float]:
        return dict(self.stats.get(server_round, {}))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        # less each reply that arrives in time
        failed = self.stats.get(server_round, {}).get("failed-replies", 0.0)  # the asynchronous loop's, if any
        self.stats[server_round] = {"failed-replies": failed, "missing-replies": float(len(messages))}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = in_partition_order(replies)
        stats = self.stats.setdefault(server_round, {"failed-replies": 0.0, "missing-replies": 0.0})
        stats["missing-replies"] = max(stats["missing-replies"] - len(replies), 0.0)  # timed out, lost
        for msg in replies:
            if msg.has_error():  # the wrapped strategy logs and skips it
                self.fail(server_round, msg)
        return self.strategy.aggregate_train(server_round, replies)

    def fail(self, server_round: int, msg: Message) -> None:
        """Count one error reply (a crash, a decline) of ``server_round``, with its node and reason."""
        stats = self.stats.setdefault(server_round, {"failed-replies": 0.0, "missing-replies": 0.0})
        stats["failed-replies"] = stats.get("failed-replies", 0.0) + 1
        self.failures.append({"round": server_round, "node": msg.metadata.src_node_id,
                              "reason": msg.error.reason or f"error code {msg.error.code}"})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, in_partition_order(replies))
