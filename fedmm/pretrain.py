"""Central training of the base model on the public split, and its cache.

LoRA on a randomly initialised frozen base does not learn, so the base
(``pretrained = "public-pretrain"``) is trained centrally on the public
split, which is disjoint from all client and server data:

- a model with published towers (``effnet-lite0-minilm``, see fedmm.towers)
  keeps them frozen and only aligns its two projection heads and the logit
  scale with ClipLoss, on tower features computed once;
- any other model (``fedmm-tiny-vit``) is a CLIP trained from scratch.

The base is built once, cached as safetensors under the user cache dir
(keyed by everything that determines it), and reused by the server and every
client. Its seed is fixed (``BASE_SEED``), not the run seed: the base is a
shared artifact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from . import model as models
from . import towers
from .config import Settings
from .data import Batch, dataset_version, public_split, to_batch
from .lora import clip_of
from .train import train_steps

log = logging.getLogger(__name__)
BASE_SEED = 0
RECIPE_VERSION = 1


def base_checkpoint_path(settings: Settings) -> Path:
    recipe = {
        "model": settings.model,
        "architecture": models.config_of(settings.model),
        "data": dataset_version(settings.public_dataset or settings.dataset),  # what it pretrains on
        "steps": settings.pretrain_steps,
        "batch": settings.pretrain_batch_size,
        "lr": settings.pretrain_lr,
        "seed": BASE_SEED,
        "recipe": RECIPE_VERSION,
    }
    if models.uses_package_towers(settings.model):
        recipe["towers"] = [towers.EFFNET_SHA256, towers.MINILM_FILES["model.safetensors"]]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return settings.cache_path / "base" / f"{settings.model}-{digest}.safetensors"


class _Heads(nn.Module):
    """The projection heads and logit scale of a two-tower model, fed tower features.

    Shares its parameters with the model: training it trains the model's heads.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        clip = clip_of(net)
        self.image_head, self.text_head, self.logit_scale = clip.visual.head, clip.text.proj, clip.logit_scale

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": nn.functional.normalize(self.image_head(image_features), dim=-1),
            "text_features": nn.functional.normalize(self.text_head(text_features), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


@torch.no_grad()
def tower_features(net: nn.Module, data: Batch, chunk: int = 64) -> Batch:
    """``data`` with images and tokens replaced by the frozen towers' pooled features."""
    net.eval()
    clip = clip_of(net)
    images, texts = [], []
    for i in range(0, len(data), chunk):
        part = data.subset(torch.arange(i, min(i + chunk, len(data))))
        images.append(clip.visual.trunk(part.images))
        mask = (part.tokens != clip.text.config.pad_token_id).long()
        texts.append(clip.text.pooler(clip.text.transformer(input_ids=part.tokens, attention_mask=mask), mask))
    return Batch(torch.cat(images), torch.cat(texts), data.labels, data.groups, data.toxic)


def _public_batch(settings: Settings, net: nn.Module) -> Batch:
    public = public_split(settings)
    if len(public) < 2:
        raise ValueError(
            f"pretrained = 'public-pretrain' needs public pairs; {settings.public_dataset or settings.dataset} has "
            f"{len(public)} (set 'public-dataset', or rows with manifest column 'split' = public)"
        )
    mean, std, size = models.image_mean_std(net)
    return to_batch(public, models.create_tokenizer(settings.model), mean, std, size)


def pretrain_base(settings: Settings, progress: bool = True) -> torch.nn.Module:
    """The public-split base: heads aligned on published towers, or a CLIP from scratch.

    Always on the CPU, whatever the run's ``device``: every node that builds it must get the same weights
    bit for bit (their fingerprint is checked), and an accelerator's kernels are neither the CPU's nor
    deterministic from one GPU to the next."""
    net = models.create_model(settings.model, seed=BASE_SEED)
    data = _public_batch(settings, net)
    if models.uses_package_towers(settings.model):
        towers.load_pretrained_towers(models.freeze(net))
        data = tower_features(net, data)
        trained: nn.Module = _Heads(net)
        for p in trained.parameters():
            p.requires_grad_(True)
        what = "aligning heads of"
    else:
        trained, what = net.train(), "pretraining base"
    total, start = settings.pretrain_steps, time.perf_counter()
    every = max(1, total // 20)

    def report(step: int, loss: float) -> None:
        if progress and (step % every == 0 or step == total):
            elapsed = time.perf_counter() - start
            log.info(
                "%s %s: step %d/%d loss %.3f (%.0fs, ~%.0fs left)",
                what, settings.model, step, total, loss, elapsed, elapsed / step * (total - step),
            )

    train_steps(
        trained, data, steps=total, batch_size=settings.pretrain_batch_size,
        lr=settings.pretrain_lr, weight_decay=0.1, seed=BASE_SEED, warmup_cosine=True, progress=report,
    )
    return models.freeze(net)


def ensure_base_checkpoint(settings: Settings, progress: bool = True) -> Path:
    """The cached public-pretrained base; built (once, under a file lock, on the CPU) when missing."""
    path = base_checkpoint_path(settings)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
        if not path.is_file():
            log.info("base checkpoint %s missing: pretraining on the public split", path)
            models.save_checkpoint(pretrain_base(settings, progress), path)
    return path


def load_base_model(settings: Settings, progress: bool = True) -> torch.nn.Module:
    """The frozen base model the run config asks for, identical on every node (on the CPU: the caller moves it
    once it has its fingerprint)."""
    return models.create_base_model(settings.model, base_weights(settings, progress))


def base_weights(settings: Settings, progress: bool = True) -> models.BaseWeights:
    """``pretrained`` as weights the model factory loads: the public-pretrained base is its cached checkpoint
    (built first when missing), 'none' the run seed's init, a path a local checkpoint, anything else a tag."""
    source = settings.pretrained
    if source == "public-pretrain":
        return models.BaseWeights("file", str(ensure_base_checkpoint(settings, progress)), seed=BASE_SEED)
    if source == "none":
        return models.BaseWeights("random", seed=settings.seed)
    if Path(source).expanduser().is_file():
        return models.BaseWeights("file", source, seed=settings.seed)
    return models.BaseWeights("tag", source)
