"""RoundRecorder: what the server records after each round, and the round's checkpoint.

Flower calls it as the strategy's ``evaluate_fn`` once a round's aggregate is
in: it evaluates the global adapter on the server's held-out split
(``CentralModel``), files what every part of the chain counted for the round
(bytes, rejected, failed, missing and dropped replies, clipped updates,
multipliers, epsilon; ``server.chain.Chain`` names the parts), the round's
wall time, the wrappers' price and the server's memory, prints the headline
with the elapsed time and the job's ETA, writes every number of the round as
a TensorBoard scalar (``<report>/tensorboard``: ``tensorboard --logdir`` shows a
running job and compares finished ones), and saves the checkpoint that lets a
run continue after the round.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from logging import INFO
from pathlib import Path
from typing import Any

import psutil
from flwr.app import ArrayRecord, MetricRecord
from flwr.supercore import log

from fedmm.config import Settings
from server.central import CentralModel
from server.chain import Chain
from server.checkpoint import save_checkpoint
from server.history import MetricsHistory

# Printed each round, in this order, when present.
HEADLINE = ("central/zs-acc", "central/i2t-R@1", "central/t2i-R@1", "evaluate/zs-acc", "train/train-loss",
            "central/acc-gap", "central/toxic-top1", "constraints/multiplier-group-gap",
            "constraints/multiplier-toxicity", "privacy/epsilon", "train/dp-epsilon-max")


class RoundRecorder:
    def __init__(self, settings: Settings, out: Path, central: CentralModel, chain: Chain,
                 history: MetricsHistory, num_rounds: int, done: int = 0) -> None:
        self.settings, self.out, self.central, self.chain, self.history = settings, out, central, chain, history
        self.num_rounds, self.done = num_rounds, done  # rounds completed before a resume
        self.round_started = self.started = time.perf_counter()
        self.events: Any = None  # TensorBoard's writer, opened with the first round

    def _scalars(self, server_round: int, row: dict[str, Any]) -> None:
        """Every number of the round, flushed at once: TensorBoard's reader sees the round while the job runs."""
        if self.events is None:
            from torch.utils.tensorboard import SummaryWriter

            self.events = SummaryWriter(log_dir=str(self.out / "tensorboard"), flush_secs=3600)
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.events.add_scalar(key, value, server_round)
        self.events.flush()

    def _timing(self, server_round: int) -> str:
        """Elapsed since this process started the job, and the time left at this process's pace per round."""
        elapsed = time.perf_counter() - self.started
        rounds = server_round - self.done
        left = (self.num_rounds - server_round) * elapsed / rounds if rounds > 0 else float("nan")
        return (f"elapsed {timedelta(seconds=round(elapsed))}, "
                f"ETA {timedelta(seconds=round(left)) if math.isfinite(left) else '?'}")

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += self.done
        if server_round == self.done and self.done:  # evaluated and recorded before the interruption
            return None
        metrics = self.central.evaluate(arrays)
        self.history.record_central(server_round, metrics)
        now = time.perf_counter()
        if server_round > 0:
            self._record_round(server_round, now)
        row = self.history.rounds[server_round]
        log(INFO, "fedmm round %d/%d (%s): %s", server_round, self.num_rounds, self._timing(server_round),
            " ".join(f"{k}={row[k]:.4f}" for k in HEADLINE if k in row))
        self._scalars(server_round, row)
        if server_round > 0:  # the round is complete: everything needed to continue after it
            save_checkpoint(self.out, server_round, arrays, self.chain.stateful, self.history.state_dict(),
                            self.settings)
            self.history.record(server_round, "checkpoint-seconds", time.perf_counter() - now)
        self.round_started = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    def _record_round(self, server_round: int, now: float) -> None:
        chain, record = self.chain, self.history.record
        record(server_round, "round-seconds", now - self.round_started)
        record(server_round, "wrapper-seconds",
               chain.outer.seconds.get(server_round, 0.0) - chain.user_timer.seconds.get(server_round, 0.0))
        record(server_round, "server-rss-mib", psutil.Process().memory_info().rss / 2**20)
        for part in chain.measured:
            for key, value in part.round_stats(server_round).items():
                record(server_round, key, value)
        spent = chain.ledger() if chain.ledger is not None else None
        if spent is not None:
            record(server_round, "privacy/epsilon", spent.epsilon)
            record(server_round, "privacy/releases", spent.num_releases)

    def close(self) -> None:
        """The job is over: close the event file."""
        if self.events is not None:
            self.events.close()

    def dropped_updates(self) -> list[dict[str, object]]:
        """Every update dropped before aggregation, with its round, node and reason."""
        secagg = self.chain.secagg.drops if self.chain.secagg is not None else []
        return self.chain.reply_check.drops + secagg + self.chain.codec.drops + self.chain.validation.drops
