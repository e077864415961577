"""Central pretraining of the base model on the public split, and its cache.

LoRA on a randomly initialised frozen base does not learn, so the default
base (``pretrained = "public-pretrain"``) is a CLIP trained centrally on the
public split, which is disjoint from all client and server data. It is built
once, cached as safetensors under the user cache dir (keyed by everything
that determines it), and reused by the server and every client. Its seed is
fixed (``BASE_SEED``), not the run seed: the base is a shared artifact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from . import model as models
from .config import Settings
from .data import dataset_version, load_splits, to_batch
from .train import train_steps

log = logging.getLogger(__name__)
BASE_SEED = 0
RECIPE_VERSION = 1


def base_checkpoint_path(settings: Settings) -> Path:
    recipe = {
        "model": settings.model,
        "data": dataset_version(settings.dataset),
        "steps": settings.pretrain_steps,
        "batch": settings.pretrain_batch_size,
        "lr": settings.pretrain_lr,
        "seed": BASE_SEED,
        "recipe": RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return settings.cache_path / "base" / f"{settings.model}-{digest}.safetensors"


def pretrain_base(settings: Settings, progress: bool = True) -> torch.nn.Module:
    """Train every parameter of a fresh model with ClipLoss on the public split."""
    public = load_splits(settings.dataset)["public"]
    if len(public) < 2:
        raise ValueError(
            "pretrained = 'public-pretrain' needs a public split; the dataset has "
            f"{len(public)} public rows (manifest column 'split' = public)"
        )
    net = models.create_model(settings.model, seed=BASE_SEED)
    mean, std, size = models.image_mean_std(net)
    data = to_batch(public, models.create_tokenizer(settings.model), mean, std, size)
    net.train()
    total, start = settings.pretrain_steps, time.perf_counter()
    every = max(1, total // 20)

    def report(step: int, loss: float) -> None:
        if progress and (step % every == 0 or step == total):
            elapsed = time.perf_counter() - start
            log.info(
                "pretraining base %s: step %d/%d loss %.3f (%.0fs, ~%.0fs left)",
                settings.model, step, total, loss, elapsed, elapsed / step * (total - step),
            )

    train_steps(
        net, data, steps=total, batch_size=settings.pretrain_batch_size,
        lr=settings.pretrain_lr, weight_decay=0.1, seed=BASE_SEED, warmup_cosine=True, progress=report,
    )
    return models.freeze(net)


def ensure_base_checkpoint(settings: Settings, progress: bool = True) -> Path:
    """The cached public-pretrained base; built (once, under a file lock) when missing."""
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
    """The frozen base model the run config asks for, identical on every node."""
    if settings.pretrained == "public-pretrain":
        net = models.create_model(settings.model, seed=BASE_SEED)
        models.load_checkpoint(net, ensure_base_checkpoint(settings, progress))
    elif settings.pretrained == "none":
        net = models.create_model(settings.model, seed=settings.seed)
    elif Path(settings.pretrained).expanduser().is_file():
        net = models.create_model(settings.model, seed=settings.seed)
        models.load_checkpoint(net, settings.pretrained)
    else:
        net = models.load_open_clip_pretrained(settings.model, settings.pretrained)
    return models.freeze(net)
