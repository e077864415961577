"""This process's per-run and per-node caches: the model, tokenizer and prompts once per run, each
partition's tensors once per node.

One simulation actor serves many nodes in turn, and a deployment's ClientApp
process serves its one node for the whole run: building the base model and
the partition on every message would cost more than the training. Only the
adapter arrays change hands; ``load_global`` puts a message's global adapter
into the node's model (after checking the base it was trained for).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from flwr.app import Context, Message

from clients.settings import run_settings
from fedmm import lora
from fedmm import model as models
from fedmm import protocol
from fedmm.config import Profile, Settings
from fedmm.constraints import flag_toxic
from fedmm.data.images import ImageFiles, UnreadableImage
from fedmm.data import (Batch, ManifestError, class_names, client_rows, client_split, public_split, site_rows,
                        site_split, to_batch, zero_shot_prompts)
from fedmm.device import node_device
from fedmm.losses import public_pool
from fedmm.pretrain import load_base_model
from fedmm.protocol import to_numpy


@dataclass
class RunState:
    """What every node of one run shares in this process: settings, model, prompts."""

    settings: Settings
    base: Any  # the frozen base, never modified: each rank's model is a copy with LoRA
    prompts: list[list[str]]  # zero-shot class prompts, embedded by the current adapter
    tokenizer: Any
    preprocess: tuple[tuple[float, ...], tuple[float, ...], int]  # (mean, std, size)
    num_groups: int
    base_fingerprint: str
    device: torch.device = torch.device("cpu")  # where this process computes for the run (fedmm/device.py)
    public: Batch | None = None  # public pairs the objective draws from ('unicl', 'public-negatives')
    # (rank, targets) -> peft model, overwritten by every message
    nets: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict)

    def net(self, profile: Profile) -> Any:
        key = (profile.lora_rank, profile.lora_targets)
        if key not in self.nets:
            s = self.settings
            torch.manual_seed(s.seed)  # LoRA init as on the server (it is overwritten by the global anyway)
            # attach_lora modifies its model in place: copy the base unless every client has one adapter shape
            base = self.base if s.rank_plan.one_shape else copy.deepcopy(self.base)
            self.nets[key] = lora.attach_lora(base, profile.lora_rank, s.lora_alpha_for(profile.lora_rank),
                                              list(profile.lora_targets))
        return self.nets[key]


@dataclass
class Node:
    run: RunState
    partition_id: int
    profile: Profile  # this client's tier: rank, layers, batch, steps, time budget, precision, dropout
    train: Batch
    test: Batch
    decoded_bytes: int = 0  # this process's memory the node's decoded image files take (node config budget)

    @property
    def settings(self) -> Settings:
        return self.run.settings

    @property
    def rank(self) -> int:
        return self.profile.lora_rank

    @property
    def net(self) -> Any:
        return self.run.net(self.profile)


# One simulation actor serves many nodes in turn: the model is built once per
# run and process, each partition's tensors once per node.
_RUNS: dict[tuple, RunState] = {}
_NODES: dict[tuple, Node] = {}


def run_state(context: Context) -> RunState:
    """This run's shared state in this process; ``DeviceUnavailable`` when the node's device is not here."""
    settings = run_settings(context)
    device = node_device(context.node_config, settings.device)
    key = (tuple(sorted(context.run_config.items())), str(device))
    if key not in _RUNS:
        _RUNS.clear()  # a new run: drop the previous run's model and data
        _NODES.clear()
        base = load_base_model(settings, progress=False)
        base_id = models.fingerprint(base)  # of the CPU weights, as the server computes it
        base.to(device)
        tokenizer = models.create_tokenizer(settings.model)
        # the run's class and group lists when it names them; only then does a site never open 'dataset'
        names = list(settings.class_list) or class_names(client_rows(settings))
        num_groups = len(settings.group_list) or _num_groups(client_rows(settings))
        preprocess = models.image_mean_std(base)
        public = None
        if settings.public_draw:
            pairs = public_split(settings)
            if len(pairs):
                public = to_batch(public_pool(pairs, settings.public_draw, settings.seed), tokenizer,
                                  *preprocess).to(device)  # once per run, not per round
        _RUNS[key] = RunState(settings, base, zero_shot_prompts(names), tokenizer, preprocess, num_groups=num_groups,
                              base_fingerprint=base_id, device=device, public=public)
    return _RUNS[key]


def _num_groups(rows: Dataset) -> int:
    groups = rows["group"]
    return max(groups) + 1 if len(groups) else 1


def node_of(context: Context) -> Node:
    """This node's model and data, built on first use in this process.

    A node whose node config names its own manifest (``dataset``) trains and
    evaluates on that alone; otherwise it takes partition ``partition-id`` of
    ``num-partitions`` of the run's dataset (simulation, rehearsals that slice
    one dataset). Raises ``ManifestError`` when a site's data cannot be used.
    """
    run = run_state(context)
    config = context.node_config
    site = str(config.get(protocol.NODE_DATASET, "") or "")
    if not site and protocol.NODE_PARTITION_ID not in config:
        raise KeyError(f"node config: '{protocol.NODE_PARTITION_ID}' is required without a 'dataset' of its own")
    pid = protocol.partition_id_of(config, context.node_id)  # a site need not number itself
    num = int(config.get(protocol.NODE_NUM_PARTITIONS, 1))
    node_profile = config.get(protocol.NODE_PROFILE)
    key = (id(run), pid, num, node_profile, site)
    if key not in _NODES:
        if site:
            train_ds, test_ds = site_split(run.settings, site_rows(run.settings, site))
        else:
            train_ds, test_ds = client_split(run.settings, client_rows(run.settings), pid, num)
        if site and len(train_ds) + len(test_ds) == 0:
            raise ManifestError(f"this node's own manifest {site} has no 'clients' rows")
        # captions are flagged on-device by the classifier, not taken from the data's own labels
        train = to_batch(train_ds, run.tokenizer, *run.preprocess, toxic=flag_toxic(train_ds["caption"]))
        test = to_batch(test_ds, run.tokenizer, *run.preprocess, toxic=flag_toxic(test_ds["caption"]))
        budget = _decoded_budget(config) - sum(n.decoded_bytes for n in _NODES.values())
        train, test, decoded = _decoded_if_it_fits(train, test, budget, site)
        # in-memory tensors move to the device once; image files that did not fit decode per batch on the CPU
        _NODES[key] = Node(run, pid, run.settings.profile_for(pid, str(node_profile) if node_profile else None),
                           train.to(run.device), test.to(run.device), decoded)
    return _NODES[key]


def _decoded_budget(config: Mapping[str, Any]) -> int:
    """Bytes of decoded images this process may keep: node config ``decoded-images-mib`` (MiB)."""
    raw = config.get(protocol.NODE_DECODED_IMAGES_MIB, protocol.DEFAULT_DECODED_IMAGES_MIB)
    try:
        mib = float(raw)
    except (TypeError, ValueError):
        mib = -1.0
    if not mib >= 0:
        raise ManifestError(f"node config '{protocol.NODE_DECODED_IMAGES_MIB}' = {raw!r}: must be a number of "
                            "MiB >= 0 (0: decode each batch's image files as it is drawn)")
    return int(mib * 2**20)


def _decoded_if_it_fits(train: Batch, test: Batch, budget: int, site: str) -> tuple[Batch, Batch, int]:
    """Both splits with their image files decoded once when together they fit ``budget`` bytes, else as they
    are; and the bytes decoded.

    Decoded once, no training step waits for PIL; a node whose images do not fit decodes each batch as it is drawn.
    """
    need = sum(b.images.decoded_bytes for b in (train, test) if isinstance(b.images, ImageFiles))
    if need == 0 or need > budget:
        return train, test, 0
    try:
        return train.decoded(), test.decoded(), need
    except UnreadableImage as exc:
        raise ManifestError(f"this node's manifest {site or '(the run dataset)'}: {exc}") from exc


def load_global(node: Node, msg: Message) -> tuple[OrderedDict[str, np.ndarray], list[torch.Tensor]]:
    """Load the message's global adapter into the node's model: the global arrays, and the model's trainable copies."""
    expected = protocol.config_in(msg.content).get(protocol.BASE_FINGERPRINT) if protocol.CONFIG in msg.content else None
    if expected is not None and expected != node.run.base_fingerprint:
        raise ValueError(
            f"partition {node.partition_id}: this node's frozen base ({node.run.base_fingerprint}) "
            f"differs from the server's ({expected!s}); adapters trained on different bases "
            "cannot be averaged — check 'model', 'pretrained' and the base cache"
        )
    global_arrays = to_numpy(protocol.arrays_in(msg.content))
    lora.load_global(node.net, dict(global_arrays))
    return global_arrays, [p.detach().clone() for p in lora.trainable_parameters(node.net)]
