"""The server's own model: the frozen base with the global adapter, evaluated on the server's held-out split.

``CentralModel.build`` makes the base (the same factory the clients use), the
global adapter at the largest client rank (seeded LoRA init), the held-out
batch with its toxic-caption flags (the distractors of the toxic-retrieval
measurement) and the zero-shot prompts; ``evaluate`` loads a round's global
arrays and measures them (``central/*`` metrics); ``export`` writes the final
adapter in PEFT's format, plus any frozen update a strategy keeps outside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.supercore import log
from safetensors.torch import save_file

from fedmm import lora
from fedmm import model as models
from fedmm.config import Settings
from fedmm.constraints import flag_toxic
from fedmm.data import Batch, class_names, to_batch, zero_shot_prompts
from fedmm.evaluate import class_embeddings, evaluate
from fedmm.pretrain import load_base_model
from fedmm.protocol import is_downlink_only, to_numpy


@dataclass
class CentralModel:
    net: Any  # the base with the global adapter (peft model)
    tokenizer: Any
    prompts: list[list[str]]
    held_out: Batch
    base_fingerprint: str  # clients refuse to train on a different base
    base_bytes: int
    num_classes: int
    normalisation: tuple[tuple[float, ...], tuple[float, ...]]  # the images' mean and std: the audit perturbs pixels

    @classmethod
    def build(cls, settings: Settings, server_split: Any, device: torch.device) -> CentralModel:
        log(INFO, "fedmm: building base model %s (%s) on %s", settings.model, settings.pretrained, device)
        base = load_base_model(settings)
        fingerprint = models.fingerprint(base)  # of the CPU weights, as every client computes it
        base.to(device)
        base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        tokenizer = models.create_tokenizer(settings.model)
        mean, std, size = models.image_mean_std(base)
        names = class_names(server_split)
        torch.manual_seed(settings.seed)  # LoRA init is part of the seeded run
        # the global adapter has the largest client rank; clients of lower rank fit it to theirs
        rank = settings.global_rank
        net = lora.attach_lora(base, rank, settings.lora_alpha_for(rank), settings.lora_target_list)
        held_out = to_batch(server_split, tokenizer, mean, std, size, toxic=flag_toxic(server_split["caption"]))
        return cls(net, tokenizer, zero_shot_prompts(names), held_out, fingerprint, base_bytes, len(names),
                   (tuple(mean), tuple(std)))

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in lora.adapter_state(self.net).items()})

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        lora.load_global(self.net, dict(to_numpy(arrays)))  # adapter, and a strategy's frozen update if any
        # the adapter changes the text tower too: embed the prompts with it
        return evaluate(self.net, self.held_out, class_embeddings(self.net, self.tokenizer, self.prompts),
                        audit=self.normalisation)

    def export(self, arrays: ArrayRecord, out: Path) -> Path:
        """The final adapter in PEFT's format under ``out/adapter``; its folder."""
        final = dict(to_numpy(arrays))
        lora.load_global(self.net, final)
        adapter_dir = lora.export_peft(self.net, out / "adapter")
        frozen = {k: v for k, v in final.items() if is_downlink_only(k)}
        if frozen:  # e.g. FLoRA's merged update: part of the model, outside PEFT's format
            path = adapter_dir / "fedmm_frozen_update.safetensors"
            save_file({k: torch.as_tensor(v).contiguous() for k, v in frozen.items()}, str(path))
            log(INFO, "fedmm: the strategy's frozen update (add scale * B @ A to each layer's base weight) -> %s", path)
        return adapter_dir
