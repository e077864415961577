"""CompressedUpdates: compressed uplink/downlink around any strategy.

Client obligation: the ClientApp runs ``clients/compression_mod.py``. It
decodes the global adapter (on the wire always a self-describing codec
payload, fp32 included: a few concatenated arrays), and replies with
the encoded update delta = local - global (plus its error-feedback residual).

This wrapper decodes each reply before the wrapped strategy sees it: local =
reference + delta, where the reference is exactly the global the clients
decoded (the downlink payload is encoded once per round and sent to all). The
wrapped strategy then aggregates plain adapter arrays, so any Message-API
strategy, built-in or plugin, gets compression without change. A reply that
does not decode is dropped with its reason in the log, and the round goes on
— except with ``keep_every_reply`` (central DP: ``fedmm.privacy.plan.
release_independent_of_one_client``), where it enters as a zero update, so
that what one client sent cannot void the round's accounted release.
Error replies pass through untouched (``ReplyBook``, above it, counts them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

import numpy as np

from fedmm.compression import (Codec, decode_self_describing, encode_self_describing, layout_of, make_codec,
                               make_downlink_codec)
from fedmm import protocol
from fedmm.protocol import to_numpy, to_record, trainable
from strategies.wrapper import StrategyWrapper


class CompressedUpdates(StrategyWrapper):
    def __init__(
        self,
        strategy: Strategy,
        uplink: Codec | None = None,
        downlink: Codec | None = None,
        error_feedback: bool = True,
        seed: int = 0,
        keep_every_reply: bool = False,
    ) -> None:
        super().__init__(strategy)
        self.keep_every_reply = keep_every_reply
        self.uplink = uplink or make_codec("fp32")
        self.downlink = make_downlink_codec(downlink.spec) if downlink is not None else make_codec("fp32")
        self.error_feedback, self.seed = error_feedback, seed
        self.key = self.arrays_key
        self._reference: OrderedDict[str, np.ndarray] | None = None
        self.stats: dict[int, dict[str, float]] = {}  # round -> bytes and drops
        self.drops: list[dict[str, object]] = []  # updates that did not decode, with their reasons

    def round_stats(self, server_round: int) -> dict[str, float]:
        return {k.replace("bytes-", "bytes/", 1): v for k, v in self.stats.get(server_round, {}).items()}

    def summary(self) -> None:
        log(INFO, "\t├──> CompressedUpdates: uplink %s (error feedback %s), downlink %s",
            self.uplink.spec, self.error_feedback, self.downlink.spec)
        self.strategy.summary()

    def _downlink(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, OrderedDict]:
        # Always the codec's few concatenated arrays, fp32 too: Flower sends every array of a
        # message as its own object, one SuperLink request per node each, and a per-tensor
        # adapter (hundreds of arrays) made that the cost of a deployment round.
        plain = to_numpy(arrays)
        rng = np.random.default_rng([self.seed, server_round, 2**31 - 1])
        payload = encode_self_describing(self.downlink, plain, rng)
        decoded = plain if self.downlink.lossless else decode_self_describing(self.downlink, payload)
        return to_record(payload), decoded

    def _config(self, config: ConfigRecord, train: bool) -> ConfigRecord:
        extra: dict[str, str | bool | int] = {protocol.CODEC_DOWN: self.downlink.spec}
        if train:
            extra.update({protocol.CODEC_UP: self.uplink.spec, protocol.ERROR_FEEDBACK: self.error_feedback,
                          protocol.CODEC_SEED: self.seed})
        return ConfigRecord({**dict(config), **extra})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        send, self._reference = self._downlink(server_round, arrays)
        # the wrapped strategy sees the plain global arrays; the wire carries the encoded ones
        messages = list(self.strategy.configure_train(server_round, arrays, self._config(config, True), grid))
        for message in messages:
            message.content[self.key] = send
        self.stats[server_round] = {
            "bytes-downlink-per-client": float(send.count_bytes()),
            "bytes-downlink-total": float(send.count_bytes() * len(messages)),
            "dropped-updates": 0.0,
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, {})
        if self._reference is None:
            raise RuntimeError("aggregate_train before configure_train")
        # replies carry the trainable arrays only, never the downlink-only ones
        reference = trainable(self._reference)
        layout = layout_of(reference)
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)  # the wrapped strategy logs and skips it
                continue
            try:
                delta = self.uplink.decode(to_numpy(protocol.arrays_in(msg.content, self.key)), layout)
            except Exception as exc:  # noqa: BLE001 - whatever a payload holds, it is this reply's fault alone
                if not self.keep_every_reply:
                    log(WARNING, "round %d: dropped the update of node %s: %s",
                        server_round, msg.metadata.src_node_id, exc)
                    self.drops.append({"round": server_round, "node": msg.metadata.src_node_id,
                                       "reason": f"payload does not decode: {exc}"})
                    stats["dropped-updates"] = stats.get("dropped-updates", 0.0) + 1
                    continue
                log(WARNING, "round %d: the update of node %s enters as a zero update: %s",
                    server_round, msg.metadata.src_node_id, exc)
                self.drops.append({"round": server_round, "node": msg.metadata.src_node_id,
                                   "reason": f"payload does not decode: {exc}: entered as a zero update (central DP)"})
                stats["zeroed-updates"] = stats.get("zeroed-updates", 0.0) + 1
                delta = OrderedDict((k, np.zeros_like(v)) for k, v in reference.items())
            msg.content[self.key] = to_record(
                OrderedDict((k, reference[k] + delta[k]) for k in reference)
            )
            kept.append(msg)
        return self.strategy.aggregate_train(server_round, kept)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        send, _ = self._downlink(server_round, arrays)
        messages = list(self.strategy.configure_evaluate(server_round, arrays, self._config(config, False), grid))
        for message in messages:
            message.content[self.key] = send
        return messages
