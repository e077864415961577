"""Run-config keys of one concern: the model, its base weights, LoRA, and the client tiers (fedmm.model, fedmm.lora, config.tiers).
(How a key is declared, and how the groups join: ``fedmm/config/__init__.py``.)
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from .declare import (
    ConfigError,
    accepts,
    key,
    parses,
    positive,
)
from .tiers import parse_profiles, parse_ranks

BASE_SOURCES = ("public-pretrain", "none")  # besides a local checkpoint path or an open_clip tag


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


@dataclass(frozen=True)
class ModelSettings:
    """The model, its base weights, LoRA, and the client tiers (fedmm.model, fedmm.lora, config.tiers)."""

    model: str = key(
        "effnet-lite0-minilm",
        "open_clip model name (bundled: effnet-lite0-minilm = pretrained EfficientNet-Lite0 + "
        "MiniLM towers; fedmm-tiny-vit = small CLIP trained from scratch, for fast tests)",
    )
    pretrained: str = key(
        "public-pretrain",
        "base weights: 'public-pretrain' (central pretraining on the public split, "
        "cached), 'none' (random), a local checkpoint path, or an open_clip tag",
    )
    pretrain_steps: int = key(800, "optimizer steps of the central base pretraining", positive)
    pretrain_batch_size: int = key(64, "batch size of the central base pretraining", positive)
    pretrain_lr: float = key(1e-3, "learning rate of the central base pretraining", positive)
    lora_rank: int = key(8, "LoRA rank r", positive)
    lora_alpha: float = key(16.0, "LoRA scaling alpha (scale = alpha / lora-rank, for every client)", positive)
    lora_ranks: str = key(
        "",
        "per-client LoRA ranks, e.g. \"4,8,16\": partition p gets the (p mod n)-th; the global adapter "
        "has the largest; empty = every client has lora-rank",
        parses(parse_ranks, "positive integers, comma-separated"),
    )
    lora_targets: str = key(
        "auto",
        "comma-separated names of the nn.Linear / 1x1 nn.Conv2d layers that carry LoRA; "
        "'auto' = the model's attention and MLP layers (and 1x1 convs of a conv image tower)",
        accepts("auto, or module names, comma-separated")(
            lambda v: None if v.strip() else "must name at least one module"),
    )
    client_profiles: str = key(
        "",
        "named client tiers, ';'-separated, each 'name: key=value ...' with keys lora-rank, lora-targets "
        "(a subset of the run's, comma-separated), batch-size, local-steps, time-budget (seconds of local "
        "training per round; 0 = none), precision (fp32 | bf16), dropout (probability of missing a round), delay (seconds a "
        "training reply is held back: a slower device in wall time); "
        "unset keys take the run's values. E.g. \"phone: lora-rank=2 batch-size=8 time-budget=2 dropout=0.2; "
        "server: lora-rank=8\"",
        parses(parse_profiles, "name: key=value ...; name: ..."),
    )
    partition_profiles: str = key(
        "",
        "simulation: profile names cycled over partitions (partition p gets the (p mod n)-th), e.g. "
        "\"phone,phone,server\"; a SuperNode's node config 'profile' takes precedence",
    )

    def _check_model(self) -> None:
        from ..model import available_models  # open_clip's registry, plus fedmm's bundled configs

        if self.model not in available_models():
            close = difflib.get_close_matches(self.model, available_models(), n=3)
            raise ConfigError(
                f"run-config 'model': unknown open_clip model '{self.model}'"
                + (f" (did you mean {', '.join(close)}?)" if close else "; e.g. effnet-lite0-minilm, fedmm-tiny-vit, ViT-B-32")
            )
        if not self.lora_target_list:
            raise ConfigError("run-config 'lora-targets' must name at least one module")
        if self.pretrained not in BASE_SOURCES and _looks_like_path(self.pretrained):
            if not Path(self.pretrained).expanduser().is_file():
                raise ConfigError(f"run-config 'pretrained': checkpoint file not found: {self.pretrained}")

    @property
    def lora_target_list(self) -> list[str]:
        if self.lora_targets.strip() == "auto":
            from ..model import default_lora_targets

            return default_lora_targets(self.model)
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def lora_alpha_for(self, rank: int) -> float:
        """peft alpha giving rank ``rank`` the run's one scale, lora-alpha / lora-rank."""
        return self.lora_alpha * rank / self.lora_rank

    @property
    def partition_profile_list(self) -> list[str]:
        return [p.strip() for p in self.partition_profiles.split(",") if p.strip()]
