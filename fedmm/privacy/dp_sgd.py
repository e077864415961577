"""Sample-level DP: DP-SGD with Opacus on the LoRA parameters.

``train_dp_sgd`` runs ``steps`` DP-SGD steps on Poisson-sampled minibatches
(Opacus's ``make_private``: per-sample gradient clipping to ``max_grad_norm``,
Gaussian noise of std ``noise_multiplier * max_grad_norm`` on their sum). The
loss must be per-sample (``PublicNegativesLoss``), never the in-batch ClipLoss.

A fresh PrivacyEngine starts its accountant at zero, so the caller passes the
client's ledger (``history``: Opacus RDP accountant entries (sigma, q, steps)
from earlier rounds) and gets the extended ledger back; ``sample_epsilon``
turns a ledger into epsilon. The caller keeps the ledger across rounds
(fedmm's ClientApp: ``context.state``).
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Sequence

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data import Batch
from ..train import LossTerm, TrainStats, forward, local_optimizer
from ..losses import PublicNegativesLoss

History = list[tuple[float, float, int]]  # Opacus RDPAccountant.history: (sigma, sample rate, steps)

GRAD_SAMPLE_MODES = ("hooks", "ghost")


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q that ``train_dp_sgd`` uses: 1 / batches per epoch (Opacus's rule)."""
    return 1.0 / math.ceil(num_examples / min(batch_size, num_examples))


def sample_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a DP-SGD ledger at ``delta`` (Opacus's RDP accountant)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


def train_dp_sgd(
    model: nn.Module,
    data: Batch,
    loss: PublicNegativesLoss,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    history: Sequence[tuple[float, float, int]] = (),
    weight_decay: float = 0.0,
    grad_sample_mode: str = "hooks",
    extra_terms: Sequence[LossTerm] = (),
    optimizer: str = "adamw",
) -> tuple[TrainStats, History]:
    """``steps`` DP-SGD steps (clipped, noised gradients fed to ``optimizer``: AdamW or SGD); returns
    the stats and the extended ledger.

    ``loss`` is the per-sample objective, built on ``model`` (it embeds its
    public negatives with the model's current parameters every step).

    ``extra_terms`` must not read the data (e.g. FedProx's proximal term):
    their gradient is added after clipping, like weight decay.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    if len(data) == 0:
        raise ValueError("DP-SGD needs at least one example")
    with warnings.catch_warnings():
        # Opacus warns that its noise RNG is not a CSPRNG (secure_mode needs torchcsprng; fedmm seeds
        # torch's generator from OS entropy), and torch that backward hooks fire on frozen inputs
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _train(model, data, loss, steps, batch_size, lr, noise_multiplier, max_grad_norm,
                      history, weight_decay, grad_sample_mode, extra_terms, optimizer)


def _train(
    model: nn.Module, data: Batch, loss: PublicNegativesLoss, steps: int, batch_size: int, lr: float,
    noise_multiplier: float, max_grad_norm: float, history: Sequence[tuple[float, float, int]],
    weight_decay: float, grad_sample_mode: str, extra_terms: Sequence[LossTerm], optimizer_name: str,
) -> tuple[TrainStats, History]:
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    optimizer = local_optimizer(params, optimizer_name, lr, weight_decay)
    # indices, not tensors: the loader draws Poisson batches of example ids
    loader = DataLoader(TensorDataset(torch.arange(len(data))), batch_size=min(batch_size, len(data)))
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in history]
    # which examples a Poisson draw takes must be secret too (amplification by sampling): OS entropy
    engine.secure_rng = torch.Generator().manual_seed(secrets.randbits(63))
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=loss,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        # fresh OS entropy, never the run seed: noise the server could regenerate would protect nothing
        # on the parameters' device: Opacus draws the noise where the gradients are
        noise_generator=torch.Generator(device=device).manual_seed(secrets.randbits(63)),
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        private_model, private_opt, private_loss, private_loader = made
    else:
        (private_model, private_opt, private_loader), private_loss = made, loss
    total, seen, done = 0.0, 0, 0
    start = time.perf_counter()
    try:
        while done < steps:
            for (idx,) in private_loader:
                if done == steps:
                    break
                private_opt.zero_grad(set_to_none=True)
                # an empty Poisson draw still makes a step (zero gradient plus noise), as the analysis assumes
                batch = data.subset(idx).to(device)
                out = forward(private_model, batch)
                value = private_loss(out, batch)
                value.backward()
                if not extra_terms:
                    private_opt.step()
                elif private_opt.pre_step():  # clip, noise, account; then the data-independent terms
                    reg = sum((t(model, out, batch) for t in extra_terms), torch.zeros(()))
                    for p, g in zip(params, torch.autograd.grad(reg, params, allow_unused=True)):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                    private_opt.original_optimizer.step()
                total += float(value.item()) if len(idx) else 0.0
                seen += len(idx)
                done += 1
    finally:
        private_model._close()  # remove Opacus hooks: the same model trains again next round
    elapsed = time.perf_counter() - start
    mean_loss = total / max(1, steps)
    return TrainStats(steps, seen, mean_loss, mean_loss, elapsed), list(engine.accountant.history)
