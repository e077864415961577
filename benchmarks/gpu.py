"""One client's local training on a device: fedmm's step loop against a bare PyTorch loop doing the same work.

    .venv/bin/python benchmarks/gpu.py [--device auto|cpu|cuda|cuda:N] [--models fedmm-tiny-vit,ViT-B-32]
        [--clients 10] [--steps 12] [--batch 32] [--size 224] [--files 0] [--out FILE.md]

For each model (randomly initialised: only the architecture matters for
timing) with the run's default LoRA adapter, on random images at the
model's resolution and random captions:

- bare: the limit, a plain PyTorch loop doing exactly the clients' work of
  one round (each client: load the global adapter, ``--steps`` steps of
  forward, open_clip's ClipLoss, backward, AdamW), no Flower, no codecs;
- fedmm: the same clients through ``fedmm.train.train_steps`` (what a
  ClientApp calls), the adapter loaded and read back as a client does;
- per step: samples per second, the share of a step the loop waited for
  its batch (indexing it and starting its copy to the device), peak device memory (CUDA)
  or the process's peak RSS (CPU), and device utilisation where
  nvidia-ml-py is installed.

With ``--files N`` (N > 0), a second table: one client's data as N JPEG
files (a site's manifest, 1.5x the model's resolution so the transform
resizes), trained with ``train_steps`` as a ClientApp would, decoded once
into memory (what a node whose images fit ``decoded-images-mib`` does) and
decoded per batch as it is drawn (in line on the CPU, a batch ahead in a
thread on an accelerator); the step time and the share of it spent waiting
for the batch.

Prints (and with ``--out`` writes) the tables; ``fedmm / bare`` is the
ratio the issue's goal (<= 1.25x) is about for the client side.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmm import lora  # noqa: E402
from fedmm import model as models  # noqa: E402
from fedmm.data import Batch  # noqa: E402
from fedmm.device import resolve_device  # noqa: E402
from fedmm.losses import clip_objective  # noqa: E402
from fedmm.data.images import ImageFiles  # noqa: E402
from fedmm.train import forward, train_steps  # noqa: E402


def synthetic_batch(n: int, size: int, context: int, vocab: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    tokens = torch.randint(1, vocab, (n, context), generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return Batch(images, tokens, labels, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _utilisation(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return "n/a (no nvidia-ml-py)"
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    return f"{pynvml.nvmlDeviceGetUtilizationRates(handle).gpu}%"


def bare_round(net: torch.nn.Module, adapter: dict, data: list[Batch], steps: int, batch: int,
               device: torch.device) -> float:
    """The limit: each client's steps as a plain loop, every batch already on the device."""
    loss_fn = clip_objective()
    on_device = [d.to(device) for d in data]
    _sync(device)
    start = time.perf_counter()
    for client in on_device:
        lora.set_adapter_arrays(net, adapter)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for step in range(steps):
            idx = torch.arange(step * batch, (step + 1) * batch) % len(client)
            part = client.subset(idx)
            loss = loss_fn(forward(net, part), part)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _sync(device)
    return time.perf_counter() - start


def fedmm_round(net: torch.nn.Module, adapter: dict, data: list[Batch], steps: int, batch: int,
                device: torch.device) -> tuple[float, float]:
    """The clients' work as a ClientApp does it: adapter in, ``train_steps``, adapter out (numpy); the seconds,
    and those the step loop waited for its batches."""
    _sync(device)
    start, waited = time.perf_counter(), 0.0
    for i, client in enumerate(data):
        lora.set_adapter_arrays(net, adapter)
        waited += train_steps(net, client, steps=steps, batch_size=batch, lr=1e-4, seed=i).data_seconds
        lora.get_adapter_arrays(net)
    _sync(device)
    return time.perf_counter() - start, waited


def image_files(folder: Path, n: int, size: int, seed: int) -> list[str]:
    """``n`` JPEG files of random pixels at 1.5x ``size`` (a site's photographs are larger than the model's input)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = size * 3 // 2
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.jpg"))
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(paths[-1], quality=90)
    return paths


def files_rows(name: str, device: torch.device, steps: int, batch: int, size: int | None, files: int,
               repeats: int) -> list[dict[str, str]]:
    """One client's steps on image files: decoded once into memory against decoded per batch as drawn."""
    import tempfile

    net = models.create_model(name, seed=0)
    mean, std, own = models.image_mean_std(net)
    size = size or own
    net = lora.attach_lora(models.freeze(net), 8, 16.0, models.default_lora_targets(name)).to(device)
    context = models.create_tokenizer(name)(["a"]).shape[1]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        gen = torch.Generator().manual_seed(0)
        on_disk = Batch(ImageFiles(image_files(Path(folder), files, size, 0), size, tuple(mean), tuple(std)),
                        torch.randint(1, 1000, (files, context), generator=gen), torch.arange(files) % 10,
                        torch.zeros(files, dtype=torch.long), torch.zeros(files, dtype=torch.bool))
        start = time.perf_counter()
        in_memory = on_disk.decoded()
        decode_once = time.perf_counter() - start
        for label, data in (("decoded once (fits decoded-images-mib)", in_memory),
                            ("decoded per batch" + (" (in line)" if device.type == "cpu" else " (a batch ahead)"), on_disk)):
            train_steps(net, data, steps=1, batch_size=batch, lr=1e-4)  # warm-up
            times, waits = [], []
            for r in range(repeats):
                _sync(device)
                start = time.perf_counter()
                stats = train_steps(net, data, steps=steps, batch_size=batch, lr=1e-4, seed=r)
                _sync(device)
                times.append((time.perf_counter() - start) / steps)
                waits.append(stats.data_seconds / steps)  # what the loop itself waited for its next batch
            step = statistics.median(times)
            rows.append({"model": name, "device": str(device), "px": str(size), "images": str(files),
                         "images are": label, "step (s)": f"{step:.3f}", "samples/s": f"{batch / step:.1f}",
                         "data share of a step": f"{100 * min(1.0, statistics.median(waits) / step):.1f}%",
                         "decoding all once (s)": f"{decode_once:.2f}" if data is in_memory else ""})
    return rows


def _table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r[k] for k in head) + " |" for r in rows])


def measure(name: str, device: torch.device, clients: int, steps: int, batch: int, size: int | None,
            repeats: int) -> dict[str, str]:
    net = models.create_model(name, seed=0)
    mean_std_size = models.image_mean_std(net)
    size = size or mean_std_size[2]
    net = lora.attach_lora(models.freeze(net), 8, 16.0, models.default_lora_targets(name)).to(device)
    adapter = lora.get_adapter_arrays(net)
    tokenizer = models.create_tokenizer(name)
    context = tokenizer(["a"]).shape[1]
    data = [synthetic_batch(steps * batch, size, context, 1000, seed=i) for i in range(clients)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bare_round(net, adapter, data[:1], 1, batch, device)  # warm-up: kernels, allocator
    bare, ours, waits = [], [], []
    for _ in range(repeats):  # side by side, alternating
        bare.append(bare_round(net, adapter, data, steps, batch, device))
        seconds, waited = fedmm_round(net, adapter, data, steps, batch, device)
        ours.append(seconds)
        waits.append(waited / seconds)
    b, f = statistics.median(bare), statistics.median(ours)
    step = f / (clients * steps)
    wait = statistics.median(waits) * step
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (device)" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)")
    return {"model": name, "device": str(device), "px": str(size), "clients x steps x batch": f"{clients} x {steps} x {batch}",
            "bare round (s)": f"{b:.2f}", "fedmm round (s)": f"{f:.2f}", "fedmm / bare": f"{f / b:.2f}x",
            "samples/s": f"{batch / step:.1f}", "data share of a step": f"{100 * wait / step:.1f}%",
            "peak memory": peak, "utilisation": _utilisation(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="fedmm-tiny-vit,ViT-B-32")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--files", type=int, default=0,
                        help="also time one client's steps on this many image files (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each loop, alternating; medians")
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    rows = [measure(m.strip(), device, args.clients, args.steps, args.batch, args.size, args.repeats)
            for m in args.models.split(",") if m.strip()]
    table = _table(rows)
    if args.files > 0:
        first = args.models.split(",")[0].strip()
        table += "\n\n" + _table(files_rows(first, device, args.steps, args.batch, args.size, args.files, args.repeats))
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
