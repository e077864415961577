"""Local training: a contrastive objective plus pluggable extra loss terms.

Plain torch, no Flower: ``train_steps`` runs a fixed number of optimizer steps
over random minibatches of an in-memory ``Batch``. The objective is one of
``fedmm.losses`` (open_clip's ClipLoss by default). Extra terms (FedProx's proximal term, constraint terms) are callables
added to the loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .config import LOCAL_OPTIMIZERS
from .data import Batch
from .device import model_device
from .losses import LossFn, clip_objective

LossTerm = Callable[[nn.Module, dict[str, torch.Tensor], Batch], torch.Tensor]


def local_optimizer(params: Sequence[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The clients' optimizer (run-config ``local-optimizer``). AdamW is the default; plain SGD (no
    momentum) makes an update equal to lr times the summed gradients, which QFedAvg's L = 1/lr relies on."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"local optimizer must be one of {LOCAL_OPTIMIZERS}, got {name!r}")


@dataclass
class TrainStats:
    steps: int
    examples_seen: int
    loss: float  # mean total loss over the steps
    clip_loss: float  # mean contrastive loss (without extra terms) over the steps
    seconds: float
    data_seconds: float = 0.0  # of ``seconds``, waiting for the next batch (decoding, indexing, the copy's launch)


def proximal_term(reference: Sequence[torch.Tensor], mu: float) -> LossTerm:
    """FedProx (Li et al. 2020): mu/2 * ||w - w_global||^2 over the trainable tensors."""
    anchors = [r.detach().clone() for r in reference]

    def term(model: nn.Module, _out: dict[str, torch.Tensor], _batch: Batch) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return 0.5 * mu * sum((((p - a) ** 2).sum() for p, a in zip(params, anchors)), torch.zeros(()))

    return term


def forward(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    return model(batch.images, batch.tokens)


def train_steps(
    model: nn.Module,
    data: Batch,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    extra_terms: Sequence[LossTerm] = (),
    loss_fn: LossFn | None = None,
    warmup_cosine: bool = False,
    progress: Callable[[int, float], None] | None = None,
    time_budget: float = 0.0,
    precision: str = "fp32",
    optimizer: str = "adamw",
) -> TrainStats:
    """``steps`` steps of ``optimizer`` (``local_optimizer``) on the model's trainable parameters.

    ``time_budget`` > 0: stop after the step that used it up (at least one
    step), so a slow client reports the partial work that fit (FedProx's
    partial work); ``TrainStats.steps`` is the number done. ``precision`` =
    "bf16" runs forward and loss under CPU/GPU autocast; the adapter stays fp32.

    ``loss_fn`` maps (model output, batch) to the loss; None = open_clip's ClipLoss.

    ``warmup_cosine``: linear warm-up over the first 10% of steps, then cosine
    decay (training from scratch collapses to the ln(batch) plateau without it).
    """
    if len(data) < 2:
        raise ValueError(f"contrastive training needs at least 2 examples, got {len(data)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = local_optimizer(params, optimizer, lr, weight_decay)
    scheduler = None
    if warmup_cosine:
        warm = max(1, steps // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))),
        )
    if loss_fn is None:
        loss_fn = clip_objective()
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(data))
    device = params[0].device
    # the losses stay on the device until the end: a float() per step would wait for the step to finish
    total = torch.zeros((), dtype=torch.float64, device=device)
    clip_total = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.perf_counter()
    done = 0
    batches = step_batches(data, draws(len(data), bs, steps, gen), device)
    waited = 0.0
    for step in range(steps):
        if time_budget > 0 and step > 0 and time.perf_counter() - start >= time_budget:
            batches.close()
            break
        asked = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - asked
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward(model, batch)
            clip = loss_fn(out, batch)
            loss = clip + sum((t(model, out, batch) for t in extra_terms), torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach().double()
        clip_total += clip.detach().double()
        seen += bs
        done += 1
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    return TrainStats(done, seen, float(total) / done, float(clip_total) / done, time.perf_counter() - start, waited)


def draws(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Each step's example indices: a random order, reshuffled each epoch (a batch never wraps)."""
    order, cursor = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def step_batches(data: Batch, indices: Iterator[torch.Tensor], device: torch.device,
                 ahead: bool | None = None) -> Generator[Batch, None, None]:
    """The steps' batches on ``device``.

    Image files (a node whose images did not fit its decoded budget) decode one batch ahead in a thread on an
    accelerator, so the device computes a step while the next batch's files decode (PIL releases the GIL while
    it decodes). On the CPU they decode in line: a decoding thread would take the cores the step computes on.
    ``ahead`` overrides that choice.
    """
    if ahead is None:
        ahead = data.files and device.type != "cpu"
    if not ahead:
        for idx in indices:
            yield data.subset(idx).to(device)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="fedmm-decode") as pool:
        pending: Future[Batch] | None = None
        for idx in indices:
            upcoming = pool.submit(data.subset, idx)
            if pending is not None:
                yield pending.result().to(device)
            pending = upcoming
        if pending is not None:
            yield pending.result().to(device)


@torch.no_grad()
def mean_loss(model: nn.Module, data: Batch, batch_size: int, loss_fn: LossFn | None = None) -> float:
    """Mean loss (``loss_fn``, default ClipLoss) of the model over ``data`` in its natural order (no update)."""
    loss_fn, total, batches = loss_fn or clip_objective(), 0.0, 0
    device = model_device(model)
    for i in range(0, len(data) - 1, batch_size):  # a batch needs >= 2 pairs
        batch = data.subset(torch.arange(i, min(i + batch_size, len(data)))).to(device)
        total += float(loss_fn(forward(model, batch), batch))
        batches += 1
    return total / max(1, batches)
