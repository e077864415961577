"""fedmm ServerApp: settings -> strategy chain -> rounds -> final adapter + report.

One round (docs/architecture.md follows it through the files): the chain
(server/chain.py) sends the sampled nodes the global adapter (an
``ArrayRecord`` of LoRA tensors only) with the train config; clients train
and reply; the chain checks, decodes, validates and aggregates the replies;
clients evaluate on their held-out split; ``RoundRecorder`` evaluates the
new global adapter on the server's held-out split (``central/*``), files the
round's numbers and saves its checkpoint.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import torch
from datasets import Dataset
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.supercore.logger import FLOWER_LOGGER

from fedmm import protocol, report
from fedmm.config import ConfigError, Settings
from fedmm.methods import CarriesMethodArrays, ClientMethod, method_class
from fedmm.data import class_names, group_names, public_split, server_split
from fedmm.device import DeviceUnavailable, resolve_device
from fedmm.logs import quiet_root_logger
from fedmm.privacy.plan import privacy_plan, privacy_summary
from server.asynchronous import AsynchronousLoop
from server.central import CentralModel
from server.chain import build_chain, build_strategy, check_ring
from server.checkpoint import ResumedRounds, check_ledger, load_checkpoint, load_rng_state, load_strategy_state
from server.history import MetricsHistory
from server.recording import RoundRecorder

app = ServerApp()

# Every Flower record printed once: no root handler from a library's basicConfig (fedmm/logs.py).
quiet_root_logger()


class _ToFlowerLog(logging.Handler):
    """Send fedmm's library logs (e.g. base pretraining progress) to Flower's log stream."""

    def emit(self, record: logging.LogRecord) -> None:
        FLOWER_LOGGER.handle(record)


logging.getLogger("fedmm").addHandler(_ToFlowerLog())
logging.getLogger("fedmm").setLevel(logging.INFO)


def output_dir(settings: Settings) -> Path:
    if settings.output_dir:
        return Path(settings.output_dir).expanduser().resolve()
    return Path.home() / "fedmm-runs" / datetime.now().strftime("%Y%m%d-%H%M%S")


def server_device(settings: Settings) -> torch.device:
    """The device the run config names, as this machine has it; the error names the key, before any client."""
    try:
        return resolve_device(settings.device)
    except DeviceUnavailable as exc:
        raise ConfigError(f"run-config 'device' = {settings.device!r} on the server: {exc}") from exc


@app.main()
def main(grid: Grid, context: Context) -> None:
    # Validation first: a bad run config, strategy argument or checkpoint fails here, before any client is contacted.
    settings = Settings.from_run_config(context.run_config)
    device = server_device(settings)
    history = MetricsHistory()
    strategy = build_strategy(settings, history)
    out = output_dir(settings)
    checkpoint = load_checkpoint(out, settings) if settings.resume else None
    if checkpoint is not None:
        checkpoint.check_config(settings)
    elif settings.resume:
        log(WARNING, "fedmm: resume: no checkpoint in %s, starting at round 1", out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(settings.seed)  # Flower samples nodes with Python's RNG

    held_out = server_split(settings)
    _check_public_split(settings)
    _check_name_lists(settings, held_out)
    central = CentralModel.build(settings, held_out, device)
    initial = central.initial_arrays()
    if isinstance(strategy, CarriesMethodArrays):  # e.g. SCAFFOLD's control variate, beside the adapter
        initial = strategy.with_method_arrays(initial)
    num_nodes = len(list(grid.get_node_ids()))
    log(INFO, "fedmm: base %s; adapter %d tensors, %.1f KiB (%.2f%% of the %.1f MiB base); %d classes, "
        "%d server held-out samples; report -> %s", central.base_fingerprint, len(initial),
        initial.count_bytes() / 1024, 100 * initial.count_bytes() / central.base_bytes, central.base_bytes / 2**20,
        central.num_classes, len(central.held_out), out)
    chain = build_chain(settings, strategy, history, num_nodes)
    dim = protocol.trainable_size(initial)  # the values one update holds
    check_ring(chain, dim)
    num_rounds, privacy_notes = privacy_plan(settings, num_nodes, chain.secagg.plan if chain.secagg else None, dim)

    done, arrays = 0, initial
    if checkpoint is not None:
        done, arrays = checkpoint.server_round, checkpoint.arrays
        load_strategy_state(chain.stateful, checkpoint.strategy, checkpoint.state_arrays,
                            f"checkpoint {checkpoint.state_file}")
        history.load_state_dict(checkpoint.history)
        check_ledger(chain.ledger() if chain.ledger else None, done, history.rounds,
                     f"checkpoint {checkpoint.state_file}")
        load_rng_state(checkpoint.rng, checkpoint.state_arrays)
        log(INFO, "fedmm: resuming %s after round %d of %d", out, done, num_rounds)
    recorder = RoundRecorder(settings, out, central, chain, history, num_rounds, done)
    train_config = _train_config(settings, chain.user, central.base_fingerprint)
    evaluate_config = ConfigRecord({protocol.BASE_FINGERPRINT: central.base_fingerprint, **_method_field(settings)})
    loop = None
    if done < num_rounds and settings.asynchronous:  # FedBuff on the Grid's push/pull (server/asynchronous.py)
        loop = AsynchronousLoop(settings, chain, history, recorder, grid, train_config, evaluate_config,
                                num_rounds, done)
        arrays = loop.run(arrays)
    elif done < num_rounds:
        result = (ResumedRounds(chain.outer, done) if done else chain.outer).start(
            grid=grid, initial_arrays=arrays, num_rounds=num_rounds - done, timeout=settings.round_timeout,
            train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=recorder,
        )
        arrays = result.arrays if len(result.arrays) else arrays
    recorder.close()
    adapter_dir = central.export(arrays, out)
    paths = report.write_report(out, settings=settings, rounds=dict(history.rounds), clients=history.clients, extra={
        "adapter-bytes": initial.count_bytes(),
        "base-model-bytes": central.base_bytes,
        "adapter-dir": str(adapter_dir),
        "privacy": privacy_summary(settings, num_nodes, privacy_notes),
        "group-names": list(settings.group_list) or group_names(held_out),
        "failed-replies": chain.book.failures,
        "dropped-updates": recorder.dropped_updates() + (loop.dropped if loop else []),
    })
    log(INFO, "fedmm: final adapter (PEFT format) -> %s", adapter_dir)
    log(INFO, "fedmm: report -> %s", paths["summary"])


def _train_config(settings: Settings, strategy: object, base_fingerprint: str) -> ConfigRecord:
    """What every client needs for local training, sent with each round's global adapter."""
    return ConfigRecord({
        protocol.LR: settings.lr,
        protocol.LOCAL_OPTIMIZER: settings.local_optimizer,
        protocol.LOCAL_STEPS: settings.local_steps,
        protocol.BATCH_SIZE: settings.batch_size,
        protocol.PROXIMAL_MU: settings.proximal_mu,
        protocol.BASE_FINGERPRINT: base_fingerprint,
        # QFedAvg reads each client's loss of the global model; others do not pay for it.
        protocol.REPORT_TRAIN_LOSS: hasattr(strategy, "train_loss_key"),
        **_method_field(settings),
    })


def _method_field(settings: Settings) -> dict[str, str]:
    """The method whose client half every client must run (none for a server-only strategy): a site without it
    declines rather than train as FedAvg's clients do."""
    return {protocol.METHOD: settings.strategy} if method_class(settings.strategy) is not ClientMethod else {}


def _check_name_lists(settings: Settings, held_out: Dataset) -> None:
    """The run's class and group lists must be the server's data's (e.g. not 'classes' with the bundled digits)."""
    where = settings.server_dataset or settings.dataset
    if settings.class_list and class_names(held_out) != list(settings.class_list):
        raise ConfigError(f"run-config 'classes' names {list(settings.class_list)[:10]}, but the server's held-out "
                          f"data ({where}) has {class_names(held_out)[:10]}")
    groups = held_out["group"]
    if settings.group_list and len(groups) and max(groups) >= len(settings.group_list):
        raise ConfigError(f"run-config 'groups' names {len(settings.group_list)} groups, but the server's held-out "
                          f"data ({where}) has group id {max(groups)}")


def _check_public_split(settings: Settings) -> None:
    """A loss that draws public pairs needs public data (known only once the data is loaded)."""
    if settings.public_draw and len(public_split(settings)) == 0:
        key = "public-captions" if settings.objective == "unicl" else "dp-negatives"
        raise ConfigError(
            f"run-config 'loss' = '{settings.objective}' (dp = '{settings.dp}') draws public pairs at every step "
            f"('{key}' = {settings.public_draw}), and there are none: set 'public-dataset', or give 'dataset' "
            f"rows with manifest column 'split' = public"
            + (f"; or set '{key}' = 0 to train in-batch only" if key == "public-captions" else "")
        )
