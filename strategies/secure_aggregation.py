"""SecureAggregation: the server learns only the weighted sum of the clients' updates (SecAgg+, Bell et al. 2020).

Client obligation: fedmm's ClientApp with ``clients/secagg_mod.py``. With
``secagg`` in the train config a client trains as usual, keeps its encoded
update in its own state and replies with two public keys (and its metrics)
instead of the update. This wrapper then runs SecAgg+'s stages as messages
of type ``query.secagg`` through the Grid, each with the round's timeout
(fedmm.secagg computes them): share (each client Shamir-shares its secrets
with its neighbourhood, encrypted for each holder), mask (each client clips
its update to C, scales it by its weight w / max w, rotates, rounds to
integers, adds its noise share and sends it masked in Z_2^b), unmask (the
clients send the shares that remove the masks, never both kinds of one
client). The server ends with the exact ring sum, decodes it, divides by
the contributors' summed weights, and hands every contributor's reply on
carrying that same mean update: the strategy beneath (FedAvg's weighted
mean, then its server optimiser if any) computes exactly its usual result
from it, and every wrapper beneath (decoding, validation, DP accounting,
constraints) reads the replies as it always does, metrics per client.

What the server checks: that a round sums at most the contributors its plan
was sized for (a larger sampled cohort is cut at random to that size, so the
ring sum cannot wrap), each reply's metrics, each public key (PEM on the
protocol's curve, secp384r1, or its sender is dropped before any neighbour
uses it), the shape, dtype and range of each masked vector, that the
contributors stay one connected group of neighbours (otherwise unmasking
would reveal each group's sum: the round aborts), and the decoded mean:
honest contributors' weighted mean of updates clipped to C has norm at most
C plus the rounding's and the noise's bounded share
(``IntegerCode.mean_bound``), and a mean beyond that is clipped to it.
What it cannot check: a single client's update — a hostile client can spoil
the sum within those bounds (its clipping is its own obligation) — nor,
without verifiable secret sharing, whether a secret that does not rebuild to
its commitment was shared inconsistently by its owner or answered wrongly by
two or more of its holders: the round aborts naming the owner, and that node
takes no further part in the run's secure aggregation. No reply can crash the
round: a malformed one drops its sender, with the stage and the reason, and
the round completes while at least t clients remain.
"""

from __future__ import annotations

import random
import secrets
import time
import zlib
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy
from flwr.supercore import log

from fedmm import protocol
from fedmm.protocol import to_record
from fedmm.secagg import IntegerCode, SecAggAbort, SecAggServer, decode_sum
from fedmm.secagg.masking import ids_bytes, ids_of
from fedmm.secagg.plan import SecAggPlan
from fedmm.strategy_registry import innermost
from strategies.wrapper import StrategyWrapper

_MALFORMED = object()  # a stage reply that does not parse: SecAggServer drops its sender
# Flower's strategies whose aggregate is FedAvg's weighted mean (then a server step on it): a sum suffices
WEIGHTED_MEAN_STRATEGIES = (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)


def check_weighted_mean(strategy: Strategy, key: str, why: str) -> None:
    """Refuse, for run-config ``key``, a strategy whose aggregate is not a weighted mean of the updates (a plugin
    whose aggregate is may declare ``aggregates_weighted_mean = True``)."""
    if type(strategy) in WEIGHTED_MEAN_STRATEGIES or getattr(strategy, "aggregates_weighted_mean", False) is True:
        return
    raise ValueError(
        f"run-config '{key}' with strategy '{type(strategy).__name__}': {why}, and this strategy reads each "
        "update on its own (a median, a trimmed mean, Krum's distances, QFedAvg's per-client losses, FLoRA's "
        "stacking, HetLoRA's per-client weights). Use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad; "
        "a plugin whose aggregate is FedAvg's weighted mean may declare aggregates_weighted_mean = True"
    )


def check_secure_aggregation(strategy: Strategy) -> None:
    """Refuse a strategy that needs the individual updates (or declare ``aggregates_weighted_mean = True``)."""
    check_weighted_mean(strategy, "secure-aggregation", "secure aggregation hands the server only the weighted "
                                                        "sum of the updates")


class SecureAggregation(StrategyWrapper):
    def __init__(self, strategy: Strategy, plan: SecAggPlan, timeout: float, seed: int) -> None:
        super().__init__(strategy)
        self.plan, self.timeout, self.seed = plan, timeout, seed
        self.weight_key = str(getattr(innermost(strategy), "weighted_by_key", protocol.NUM_EXAMPLES))
        self.drops: list[dict[str, object]] = []  # round, node, reason of every client the protocol dropped
        self.stats: dict[int, dict[str, float]] = {}  # round -> contributors, dropped, seconds, bytes
        self._grid: Grid | None = None
        self._dim = 0
        self._errors: dict[int, str] = {}  # node -> why its last stage reply was an error (this round)
        self._cohort: set[int] = set()  # the nodes this round's train instruction went to
        self.excluded: dict[int, str] = {}  # node -> why it takes no further part (an abort attributed to it)

    def round_stats(self, server_round: int) -> dict[str, float]:
        return dict(self.stats.get(server_round, {}))

    def summary(self) -> None:
        log(INFO, "\t├──> SecureAggregation: SecAgg+ in Z_2^%d, threshold %d of neighbourhoods of %d, clip %g%s",
            self.plan.bits, self.plan.threshold, self.plan.neighbourhood, self.plan.clip,
            f", Skellam noise multiplier {self.plan.noise_multiplier:g}" if self.plan.noise_multiplier else "")
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._grid = grid
        self._dim = protocol.trainable_size(arrays)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.excluded:
            messages = [m for m in messages if m.metadata.dst_node_id not in self.excluded]
        # the ring's width, the noise shares and the ledger were sized for plan.clients contributors: a round
        # that sampled more (nodes joined after the ServerApp started) is cut to that many, at random, so its
        # sum can never wrap
        capped = len(messages) - self.plan.clients
        if capped > 0:
            log(WARNING, "round %d: %d nodes sampled, secure aggregation's plan is sized for %d contributors: "
                "%d are left out of this round", server_round, len(messages), self.plan.clients, capped)
            messages = random.sample(messages, self.plan.clients)
        self.stats.setdefault(server_round, {})["secagg/capped"] = float(max(0, capped))
        self._cohort = {m.metadata.dst_node_id for m in messages}
        for message in messages:
            protocol.config_in(message.content)[protocol.SECAGG] = True
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        replies = list(replies)
        errors = [r for r in replies if r.has_error()]
        stats = self.stats.setdefault(server_round, {})
        valid: dict[int, Message] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error():
                continue
            if nid not in self._cohort or nid in valid:
                reason = "secure aggregation, keys: a reply from a node not in this round's cohort, or a second one"
                log(WARNING, "round %d: dropped node %s: %s", server_round, nid, reason)
                self.drops.append({"round": server_round, "node": nid, "reason": reason})
                continue
            valid[nid] = reply
        try:
            mean, contributors = self._run(server_round, valid)
        except SecAggAbort as exc:
            log(WARNING, "round %d: secure aggregation released nothing: %s", server_round, exc)
            self.drops.append({"round": server_round, "node": exc.culprit, "reason": str(exc)})
            if exc.culprit is not None:  # it cannot abort round after round
                self.excluded[exc.culprit] = f"round {server_round}: {exc}"
                log(WARNING, "round %d: node %s takes no further part in secure aggregation", server_round,
                    exc.culprit)
            stats.update({"secagg/contributors": 0.0, "secagg/aborted": 1.0})
            return self.strategy.aggregate_train(server_round, errors)
        finally:
            stats["secagg/seconds"] = time.perf_counter() - start
        kept = []
        payload = to_record({protocol.PAYLOAD_VALUES: mean.astype(np.float32)})  # the fp32 codec's payload (CompressedUpdates)
        for nid in contributors:
            reply = valid[nid]
            del reply.content[protocol.SECAGG]
            reply.content[protocol.ARRAYS] = payload
            kept.append(reply)
        stats.update({"secagg/contributors": float(len(kept)), "secagg/aborted": 0.0})
        return self.strategy.aggregate_train(server_round, errors + kept)

    def _run(self, server_round: int, valid: dict[int, Message]) -> tuple[np.ndarray, list[int]]:
        """The stages after training: the contributors' weighted mean update (flat) and who they are."""
        plan, stats = self.plan, self.stats[server_round]
        self._errors = {}
        if len(valid) < plan.threshold:
            raise SecAggAbort(f"secure aggregation, keys: {len(valid)} clients replied to training, threshold "
                              f"{plan.threshold}")
        if len(valid) > plan.clients:  # configure_train cut the cohort; this holds whatever called it
            raise SecAggAbort(f"secure aggregation, keys: {len(valid)} contributors, the ring Z_2^{plan.bits} and "
                              f"the noise shares are sized for at most {plan.clients}")
        raw = {nid: protocol.number(protocol.metrics_in(r.content), self.weight_key) for nid, r in valid.items()}
        top = max(raw.values())
        ratio = {nid: w / top for nid, w in raw.items()}
        round_seed = zlib.crc32(f"{self.seed}:{server_round}:secagg".encode())
        code = plan.code(self._dim, round_seed)
        server = SecAggServer(sorted(valid), plan.threshold, plan.bits, code.length, plan.neighbourhood,
                              rng=random.Random(secrets.randbits(64)))
        sent = {nid: 0 for nid in valid}
        try:
            keys = server.collect_keys({nid: _keys_of(r.content[protocol.SECAGG]) for nid, r in valid.items()})
            shares = self._stage(server_round, "share", {nid: _share_request(ask, code, plan.threshold)
                                                        for nid, ask in keys.items()}, _shares_of, sent)
            inbox = server.collect_shares(shares)
            masked = self._stage(server_round, "mask", {nid: _mask_request(ask, code, ratio[nid])
                                                       for nid, ask in inbox.items()},
                                 lambda r: _masked_of(r), sent)
            asks = server.collect_masked(masked)
            unmask = self._stage(server_round, "unmask", {nid: _unmask_request(*ask) for nid, ask in asks.items()},
                                 _unmask_of, sent)
            clock = time.perf_counter()
            total = server.collect_unmask(unmask)
            stats["secagg/server-unmask-seconds"] = time.perf_counter() - clock
        finally:
            for nid, why in server.dropped.items():
                reason = why + (f" ({self._errors[nid]})" if nid in self._errors else "")
                log(WARNING, "round %d: secure aggregation dropped node %s: %s", server_round, nid, reason)
                self.drops.append({"round": server_round, "node": nid, "reason": f"secure aggregation, {reason}"})
            stats["secagg/dropped"] = float(len(server.dropped))
            stats["bytes/secagg-requests-per-client"] = float(np.mean(list(sent.values()))) if sent else 0.0
        contributors = server.contributors
        weights = [ratio[nid] for nid in contributors]
        mean = decode_sum(total, code) / sum(weights)
        norm, bound = float(np.linalg.norm(mean)), code.mean_bound(weights)
        stats["secagg/mean-clipped"] = float(norm > bound)
        if norm > bound:  # some contributor added more than a clipped update: its effect is capped
            log(WARNING, "round %d: the decoded mean has norm %.4g, more than honest contributors' updates "
                "clipped to %g allow (%.4g): clipped to it", server_round, norm, code.clip, bound)
            mean = mean * (bound / norm)
        return mean, contributors

    def _stage(self, server_round: int, stage: str, requests: dict[int, ConfigRecord],
               parse: Callable[[Message], Any], sent: dict[int, int]) -> dict[int, Any]:
        """Send one stage's requests; the parsed replies by node (_MALFORMED for one that does not parse)."""
        if self._grid is None:
            raise RuntimeError("aggregate_train before configure_train")
        clock = time.perf_counter()
        messages = []
        for nid, record in requests.items():
            record[protocol.SA_STAGE], record[protocol.SA_ROUND] = stage, server_round
            sent[nid] = sent.get(nid, 0) + record.count_bytes()
            messages.append(Message(RecordDict({protocol.SECAGG: record}), dst_node_id=nid,
                                    message_type=protocol.SECAGG_STAGES, group_id=str(server_round)))
        out: dict[int, Any] = {}
        for reply in self._grid.send_and_receive(messages, timeout=self.timeout):
            nid = reply.metadata.src_node_id
            if nid not in requests or nid in out:
                continue
            if reply.has_error():  # the last line of a remote traceback says what happened
                lines = [line for line in str(reply.error.reason).splitlines() if line.strip()]
                self._errors[nid] = (lines[-1] if lines else "error reply")[:300]
                continue
            try:
                out[nid] = parse(reply)
            except Exception:  # noqa: BLE001 - whatever a reply holds, it drops only its sender
                out[nid] = _MALFORMED
        # the exchange: the clients' work for this stage and the Grid's round trip
        self.stats[server_round][f"secagg/{stage}-seconds"] = time.perf_counter() - clock
        return out


def _record(reply: Message) -> ConfigRecord:
    record = reply.content[protocol.SECAGG]
    if not isinstance(record, ConfigRecord):
        raise TypeError("not a ConfigRecord")
    return record


def _keys_of(record: Any) -> Any:
    if not isinstance(record, ConfigRecord):
        return _MALFORMED
    return (record.get(protocol.SA_C_KEY), record.get(protocol.SA_S_KEY))


def _share_request(keys: dict[int, tuple[bytes, bytes]], code: IntegerCode, threshold: int) -> ConfigRecord:
    ids = sorted(keys)
    return ConfigRecord({protocol.SA_IDS: ids_bytes(ids), protocol.SA_C_KEYS: [keys[i][0] for i in ids],
                         protocol.SA_S_KEYS: [keys[i][1] for i in ids], protocol.SA_THRESHOLD: threshold,
                         protocol.SA_BITS: code.bits, protocol.SA_LENGTH: code.length})


def _shares_of(reply: Message) -> tuple[dict[int, bytes], bytes]:
    record = _record(reply)
    holders = ids_of(protocol.blob(record, protocol.SA_TO))
    ciphertexts = protocol.blobs(record, protocol.SA_CIPHERTEXTS)
    if len(holders) != len(ciphertexts) or len(set(holders)) != len(holders):
        raise ValueError("holders and ciphertexts differ in number, or a holder repeats")
    return dict(zip(holders, ciphertexts)), protocol.blob(record, protocol.SA_COMMITMENT)


def _mask_request(inbox: dict[int, bytes], code: IntegerCode, weight: float) -> ConfigRecord:
    sources = sorted(inbox)
    fields = {protocol.SA_CODE + k: v for k, v in code.as_dict().items()}
    return ConfigRecord({protocol.SA_FROM: ids_bytes(sources), protocol.SA_CIPHERTEXTS: [inbox[s] for s in sources],
                         protocol.SA_WEIGHT: float(weight), **fields})


def _masked_of(reply: Message) -> np.ndarray:
    arrays = reply.content[protocol.ARRAYS]
    if not isinstance(arrays, ArrayRecord) or list(arrays) != [protocol.SA_MASKED]:
        raise ValueError(f"expected one array '{protocol.SA_MASKED}'")
    return arrays[protocol.SA_MASKED].numpy()


def _unmask_request(contributors: list[int], dropped: list[int]) -> ConfigRecord:
    return ConfigRecord({protocol.SA_CONTRIBUTORS: ids_bytes(contributors), protocol.SA_DROPPED: ids_bytes(dropped)})


def _unmask_of(reply: Message) -> dict[int, bytes]:
    record = _record(reply)
    owners, shares = ids_of(protocol.blob(record, protocol.SA_OWNERS)), protocol.blobs(record, protocol.SA_SHARES)
    if len(owners) != len(shares) or len(set(owners)) != len(owners):
        raise ValueError("owners and shares differ in number, or an owner repeats")
    return dict(zip(owners, shares))
