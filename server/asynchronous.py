"""The asynchronous loop (FedBuff): clients kept busy, buffered updates applied as they arrive.

Synchronous rounds are Flower's ``Strategy.start``; ``asynchronous = true``
runs this loop instead, on the Grid's ``push_messages`` / ``pull_messages``:

1. ``concurrency`` clients (0: every node) are training at all times. Each
   dispatch is the chain's train message of the current global version t
   (``configure_train`` runs once per version, so every wrapper adds what it
   adds: the encoded downlink, multipliers, DP parameters).
2. As each reply arrives it is matched to its dispatch (a reply to a dispatch
   not in flight — a duplicate, or one that came after its ``round-timeout``
   — is dropped, so a reply is applied at most once), checked by ``ReplyCheck``
   (a malformed one is dropped with the node and the aggregation named), and
   buffered with the version it trained on; the client's slot is refilled at
   once with the current global. Each update is decoded and checked on
   arrival (the codec's checks, finiteness), so junk never takes a buffer
   slot; a reply from another node than its dispatch's, a malformed one and
   an error reply (a crash, a decline) are counted with their reason, never
   in an aggregation's batch, and that node waits for the next version. With
   ``distinct-clients`` (always under central DP: one update per client per
   release) a client whose update still waits is not dispatched again, so
   nothing piles up behind it.
3. When the buffer holds ``buffer-size`` updates, the whole chain aggregates
   them as aggregation t + 1: the codec decodes each update and rebases it
   onto the current global, validation checks it, ``StalenessWeighting``
   weights it by s(tau) (and applies delay compensation), DP, the
   multipliers' dual step and the user's strategy (FedAvg's weighted mean,
   FedAdam's step...) run per aggregation. Then the server evaluates the new
   global on its held-out data and writes the checkpoint (``RoundRecorder``).
   A new global that is not finite is not applied (the global stays).
4. ``num-server-rounds`` aggregations end the run; clients still in flight are
   abandoned (their replies are never applied), and the clients evaluate the
   final global once. A run whose buffer cannot fill — no aggregation for two
   round-timeouts, e.g. buffer-size distinct clients needed and one silent —
   stops with the reason.

Resume: a checkpoint holds everything applied so far; the updates that were
in flight or buffered at that point were never applied, and a resumed run
dispatches every client afresh at the checkpoint's version.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any, NoReturn

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedmm import protocol
from fedmm.asynchrony import Arrival, UpdateBuffer
from fedmm.compression import layout_of
from fedmm.config import ConfigError, Settings
from fedmm.privacy.plan import needs_uniform_mean
from fedmm.protocol import to_numpy, trainable
from server.chain import Chain
from server.history import MetricsHistory
from server.recording import RoundRecorder
from strategies.replies import TRAIN
from strategies.validation import finiteness_problem

# s between the loop's pulls for replies: each is one small request to the SuperLink in a deployment
PULL_INTERVAL = 0.25


class _Cohort(Grid):
    """The nodes a version's train content is configured for: a Grid to the strategy, which reads their ids;
    anything else is not the strategy's to call while configuring."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def _refuse(self, name: str) -> NoReturn:
        raise AttributeError(f"configure_train called Grid.{name}, which the asynchronous loop does not offer")

    def set_run(self, run: Any) -> None:
        self._refuse("set_run")

    @property
    def run(self) -> Any:
        self._refuse("run")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        self._refuse("create_message")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._refuse("push_messages")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._refuse("pull_messages")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._refuse("send_and_receive")


@dataclass(frozen=True)
class Dispatch:
    """One train message in flight: to whom, which global version, when."""

    node: int
    version: int
    sent: float


class AsynchronousLoop:
    def __init__(self, settings: Settings, chain: Chain, history: MetricsHistory, recorder: RoundRecorder,
                 grid: Grid, train_config: ConfigRecord, evaluate_config: ConfigRecord, num_rounds: int,
                 done: int = 0, pull_interval: float = PULL_INTERVAL) -> None:
        if chain.staleness is None:
            raise ValueError("the asynchronous loop needs the chain's StalenessWeighting (settings.asynchronous)")
        self.staleness = chain.staleness
        self.settings, self.chain, self.history, self.recorder, self.grid = settings, chain, history, recorder, grid
        self.train_config, self.evaluate_config = train_config, evaluate_config
        self.num_rounds, self.done, self.pull_interval = num_rounds, done, pull_interval
        self.version = done  # aggregations applied so far
        distinct = settings.distinct_clients or needs_uniform_mean(settings.dp)
        self.buffer: UpdateBuffer[Message] = UpdateBuffer(settings.buffer_size, distinct)
        self.in_flight: dict[str, Dispatch] = {}
        self.parked: dict[int, int] = {}  # node -> the version its failed or refused reply came at: it waits
        self.stopped: str | None = None  # why the run stopped before its last aggregation
        self._progress = time.monotonic()  # when the last aggregation (or the run) began
        self.versions: dict[int, Mapping[str, np.ndarray]] = {}  # versions still trained on (delay compensation)
        self._content: tuple[int, RecordDict] | None = None
        self.nodes: list[int] = []
        self._dispatched = self._abandoned = 0  # since the last aggregation
        self.dropped: list[dict[str, object]] = []  # replies matched to no dispatch in flight

    # --- dispatching -------------------------------------------------------------------------------------
    def _configure(self, arrays: ArrayRecord) -> RecordDict:
        """The chain's train content at the current version (configured once per version), for every dispatch.

        The chain configures a cohort of ``buffer-size`` nodes (a strategy's minimum is the buffer's size in an
        asynchronous run, and Flower's DP wrappers check that the cohort is the release's size); FedAvg and the
        wrappers give every node of it the same content, which is what any node is sent at this version."""
        if self._content is None or self._content[0] != self.version:
            cohort = _Cohort(self.nodes[:self.settings.buffer_size])
            messages = list(self.chain.outer.configure_train(self.version + 1, arrays,
                                                             ConfigRecord(dict(self.train_config)), cohort))
            if not messages or any(m.content is not messages[0].content for m in messages):
                raise ValueError(f"strategy '{self.settings.strategy}' sends each node its own train content, "
                                 "which the asynchronous loop cannot dispatch to whichever node is free")
            self._content = (self.version, messages[0].content)
            self.versions[self.version] = trainable(to_numpy(arrays))
        return self._content[1]

    def _fill(self, idle: deque[int], arrays: ArrayRecord, concurrency: int) -> None:
        """Refill every free slot with the current global (nodes parked at this version wait)."""
        waiting = {a.client for a in self.buffer.waiting} if self.buffer.distinct_clients else set()
        ready = [n for n in idle if self.parked.get(n, -1) != self.version and n not in waiting]
        free = concurrency - len(self.in_flight)
        if not ready or free <= 0:
            return
        content = self._configure(arrays)
        send = ready[:free]
        for node in send:
            idle.remove(node)
        messages = [Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                            group_id=str(self.version + 1)) for node in send]
        now = time.monotonic()
        for node, message_id in zip(send, self.grid.push_messages(messages)):
            if message_id:
                self.in_flight[message_id] = Dispatch(node, self.version, now)
            else:  # not accepted by the SuperLink (e.g. the node left): try again later
                idle.append(node)
        self._dispatched += len(send)

    # --- arrivals ----------------------------------------------------------------------------------------
    def _arrive(self, reply: Message, idle: deque[int]) -> None:
        dispatch = self.in_flight.pop(reply.metadata.reply_to_message_id, None)
        node, at = reply.metadata.src_node_id, self.version + 1
        if dispatch is None:
            reason = "a reply to no dispatch in flight (a duplicate, or late after its round-timeout)"
            log(WARNING, "aggregation %d: dropped the reply of node %s: %s", at, node, reason)
            self.dropped.append({"round": at, "node": node, "reason": reason})
            return
        idle.append(dispatch.node)
        if node != dispatch.node:
            self._refuse(at, dispatch.node, f"a reply from node {node} to the dispatch sent to node {dispatch.node}")
            return
        checked = self.chain.reply_check.check(at, TRAIN, [reply])
        if not checked:  # malformed: ReplyCheck logged and kept the reason
            self.parked[dispatch.node] = self.version
            return
        if checked[0].has_error():  # counted where a synchronous round counts it, never in a release's batch
            self.chain.book.fail(at, checked[0])
            self.parked[dispatch.node] = self.version
            return
        problem = self._update_problem(checked[0], dispatch.version)
        if problem is None:
            problem = self.buffer.add(Arrival(reply.metadata.message_id, dispatch.node, dispatch.version,
                                              checked[0]))
        if problem:
            self._refuse(at, node, problem)

    def _update_problem(self, reply: Message, version: int) -> str | None:
        """Why the update of ``reply`` (trained on ``version``) must not take a buffer slot, or None: it does not
        decode against the adapter's layout, or holds non-finite values."""
        try:
            delta = self.chain.codec.uplink.decode(to_numpy(protocol.arrays_in(reply.content)),
                                                   layout_of(self.versions[version]))
        except Exception as exc:  # noqa: BLE001 - whatever a payload holds, it is this reply's fault alone
            return f"payload does not decode: {exc}"
        return finiteness_problem(delta)

    def _refuse(self, at: int, node: int, reason: str) -> None:
        log(WARNING, "aggregation %d: dropped the reply of node %s: %s", at, node, reason)
        self.dropped.append({"round": at, "node": node, "reason": reason})
        self.parked[node] = self.version

    def _abandon_late(self, idle: deque[int]) -> None:
        """A dispatch older than round-timeout is given up (its reply, if it comes, is dropped); the node is
        dispatched again."""
        limit = time.monotonic() - self.settings.round_timeout
        for message_id, dispatch in list(self.in_flight.items()):
            if dispatch.sent < limit:
                del self.in_flight[message_id]
                log(WARNING, "aggregation %d: node %s did not reply within round-timeout %gs (version %d); "
                    "dispatching it again", self.version + 1, dispatch.node, self.settings.round_timeout,
                    dispatch.version)
                idle.append(dispatch.node)
                self._abandoned += 1

    # --- aggregation -------------------------------------------------------------------------------------
    def _aggregate(self, arrays: ArrayRecord) -> ArrayRecord:
        batch = self.buffer.take()
        at = self.version + 1
        self._configure(arrays)  # the chain's references are this version's, dispatched at or not
        for arrival in batch:
            self.staleness.expect(arrival.item.metadata.message_id, self.version - arrival.version,
                                        arrival.version, self.versions[arrival.version])
        new, _ = self.chain.outer.aggregate_train(at, [a.item for a in batch])
        self._record(at, batch)
        self.version = at
        self._progress = time.monotonic()
        problem = finiteness_problem(to_numpy(new)) if new is not None else None
        if new is not None and problem is None:
            arrays = new
        elif problem is not None:
            log(WARNING, "aggregation %d: the new global is not finite (%s); the global stays as it was", at,
                problem)
            self.history.record(at, "async/non-finite-global", 1)
        else:
            log(WARNING, "aggregation %d: the strategy released no model; the global stays as it was", at)
        live = {d.version for d in self.in_flight.values()} | {a.version for a in self.buffer.waiting}
        self.versions = {v: arr for v, arr in self.versions.items() if v in live}
        self.recorder(at - self.done, arrays)  # the server's evaluation, the aggregation's record, the checkpoint
        return arrays

    def _record(self, at: int, batch: list[Arrival[Message]]) -> None:
        record = self.history.record
        record(at, "async/updates", len(batch))
        record(at, "async/dispatched", self._dispatched)
        record(at, "async/abandoned", self._abandoned)
        record(at, "async/in-flight", len(self.in_flight))
        record(at, "async/waiting", len(self.buffer.waiting))
        for key, value in self.staleness.stats.get(at, {}).items():
            record(at, f"async/{key}", value)
        taus = Counter(self.version - a.version for a in batch)
        for tau, count in sorted(taus.items()):
            record(at, f"async/staleness-{tau}", count)
        # what configure_train assumed (one message per node) is not what this aggregation dispatched
        codec = self.chain.codec.stats.get(at, {})
        if "bytes-downlink-per-client" in codec:
            codec["bytes-downlink-total"] = codec["bytes-downlink-per-client"] * self._dispatched
        self.chain.book.stats.setdefault(at, {})["missing-replies"] = float(self._abandoned)
        self._dispatched = self._abandoned = 0

    # --- the run -----------------------------------------------------------------------------------------
    def run(self, arrays: ArrayRecord) -> ArrayRecord:
        """Aggregations ``done + 1 .. num_rounds``; returns the final global."""
        if self.done == 0:
            self.recorder(0, arrays)
        self.nodes = nodes = self._wait_for_nodes()
        concurrency = self.settings.concurrency or len(nodes)
        if concurrency > len(nodes) or self.settings.buffer_size > concurrency:
            raise ConfigError(f"run-config 'concurrency' = {self.settings.concurrency}, 'buffer-size' = "
                              f"{self.settings.buffer_size}: the federation has {len(nodes)} nodes; need "
                              "buffer-size <= concurrency <= nodes")
        order = list(nodes)
        random.Random(self.settings.seed + self.done).shuffle(order)  # which nodes go first
        idle = deque(order)
        log(INFO, "fedmm: asynchronous: %d nodes, %d training at once, %d updates per aggregation%s, staleness "
            "%s%s", len(nodes), concurrency, self.settings.buffer_size,
            " from distinct clients" if self.buffer.distinct_clients else "", self.settings.staleness,
            f", delay compensation {self.settings.delay_compensation:g}" if self.settings.delay_compensation else "")
        self._progress = time.monotonic()
        while self.version < self.num_rounds:
            self._fill(idle, arrays, concurrency)
            if not self.in_flight and not self.buffer.ready():
                log(WARNING, "aggregation %d: no client can train (all declined at version %d); the run stops",
                    self.version + 1, self.version)
                break
            replies = list(self.grid.pull_messages(list(self.in_flight)))
            for reply in replies:
                self._arrive(reply, idle)
            self._abandon_late(idle)
            while self.buffer.ready() and self.version < self.num_rounds:
                arrays = self._aggregate(arrays)
            if time.monotonic() - self._progress > 2 * self.settings.round_timeout:
                clients = len({a.client for a in self.buffer.waiting})
                self.stopped = (f"no aggregation for {2 * self.settings.round_timeout:g} s (two round-timeouts): "
                                f"the buffer holds {len(self.buffer.waiting)} updates from {clients} clients and "
                                f"needs {self.settings.buffer_size}"
                                + (" from distinct clients" if self.buffer.distinct_clients else ""))
                log(ERROR, "aggregation %d: the run stops: %s", self.version + 1, self.stopped)
                break
            if not replies:
                time.sleep(self.pull_interval)
        if self.in_flight or self.buffer.waiting:
            log(INFO, "fedmm: asynchronous: stopped after %d aggregations; %d clients in flight and %d buffered "
                "updates are not applied", self.version, len(self.in_flight), len(self.buffer.clear()))
        self._evaluate(arrays)
        return arrays

    def _wait_for_nodes(self) -> list[int]:
        """The federation's nodes, once ``min-nodes`` (and the buffer's size) are connected."""
        need = max(self.settings.min_nodes, self.settings.buffer_size)
        while len(nodes := sorted(self.grid.get_node_ids())) < need:
            log(INFO, "fedmm: asynchronous: waiting for nodes to connect: %d of %d", len(nodes), need)
            time.sleep(1.0)
        return nodes

    def _evaluate(self, arrays: ArrayRecord) -> None:
        """The clients' evaluation of the final global (once: an evaluation per aggregation would stop
        training for a synchronous cohort)."""
        messages = self.chain.outer.configure_evaluate(self.version, arrays, ConfigRecord(dict(self.evaluate_config)),
                                                       self.grid)
        replies = self.grid.send_and_receive(messages, timeout=self.settings.round_timeout)
        self.chain.outer.aggregate_evaluate(self.version, replies)
