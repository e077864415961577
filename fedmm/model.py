"""open_clip models: bundled configs, one factory, local checkpoints.

A model is an open_clip config name plus where its base weights come from
(``Settings.pretrained``). The base is always frozen; LoRA (fedmm.lora) adds
the only trainable tensors. Bundled configs:

- ``effnet-lite0-minilm`` (default): published EfficientNet-Lite0 and
  all-MiniLM-L6-v2 towers from pip packages (``fedmm.towers``), heads aligned
  on the public split;
- ``fedmm-tiny-vit``: a 7.5 M-parameter CLIP trained from scratch on the
  public split, for fast tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from . import towers

_registered = False


def register_bundled_configs() -> None:
    """Make fedmm's model configs (e.g. ``fedmm-tiny-vit``) known to open_clip."""
    global _registered
    if not _registered:
        with resources.as_file(resources.files("fedmm") / "model_configs") as folder:
            open_clip.add_model_config(folder)
        _registered = True


def available_models() -> list[str]:
    register_bundled_configs()
    return open_clip.list_models()


def create_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised open_clip model, identical for identical (name, seed)."""
    if name not in available_models():
        raise ValueError(
            f"unknown model '{name}' (run-config 'model'); known: effnet-lite0-minilm, "
            f"fedmm-tiny-vit and open_clip's other models, e.g. ViT-B-32"
        )
    overrides = towers.architecture_overrides(open_clip.get_model_config(name))
    with torch.random.fork_rng(), _without_random_init_warning():
        torch.manual_seed(seed)
        # pretrained_text=False: tower weights are loaded (verified) by the caller, not by transformers
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False, output_dict=True, **overrides)
    return towers.freeze_batch_norm(model)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while building.

    Random initialisation is this factory's contract: the base weights (package towers, a
    checkpoint) are loaded afterwards, so the warning would tell every run something untrue.
    """
    root, dropped = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(dropped)  # open_clip logs it through the root logger (logging.warning)
    try:
        yield
    finally:
        root.removeFilter(dropped)


def config_of(name: str) -> dict:
    """The open_clip config of a model name (its architecture)."""
    register_bundled_configs()
    return open_clip.get_model_config(name)


def uses_package_towers(name: str) -> bool:
    """Whether the model's towers come pretrained from pip packages (``fedmm.towers``)."""
    register_bundled_configs()
    cfg = open_clip.get_model_config(name)
    return cfg is not None and towers.uses_package_towers(cfg)


def default_lora_targets(name: str) -> list[str]:
    """LoRA targets of ``lora-targets = "auto"``: attention and MLP layers of both towers."""
    if uses_package_towers(name):  # MiniLM (BERT) linears + EfficientNet's 1x1 convs
        return ["query", "key", "value", "dense", "conv_pw", "conv_pwl"]
    return ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]  # open_clip transformers


def create_tokenizer(name: str):
    register_bundled_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is not None and towers.uses_package_towers(cfg):
        return towers.create_tokenizer(cfg)
    return open_clip.get_tokenizer(name)


def image_mean_std(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Normalisation mean, std and square image size the model expects."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return tuple(cfg["mean"]), tuple(cfg["std"]), int(size)


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a local checkpoint strictly: .safetensors, or a torch file without pickle."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"checkpoint {path} does not fit the model: {str(exc)[:300]}") from exc
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)  # atomic: concurrent readers never see a partial file


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex) of the state dict: equal bases give equal fingerprints."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass(frozen=True)
class BaseWeights:
    """Where a base model's weights come from: ``random`` (the seeded init), ``file`` (a local
    checkpoint, loaded into the seeded init), or ``tag`` (an open_clip pretrained tag)."""

    kind: str
    location: str = ""  # the checkpoint file, or the tag
    seed: int = 0


def create_base_model(name: str, weights: BaseWeights) -> torch.nn.Module:
    """The frozen base model ``name`` with ``weights``: the one factory every side builds its base with."""
    if weights.kind == "tag":
        net = load_open_clip_pretrained(name, weights.location)
    elif weights.kind in ("random", "file"):
        net = create_model(name, seed=weights.seed)
        if weights.kind == "file":
            load_checkpoint(net, weights.location)
    else:
        raise ValueError(f"unknown base-weights kind {weights.kind!r}; known: random, file, tag")
    return freeze(net)


def load_open_clip_pretrained(name: str, tag: str) -> torch.nn.Module:
    """An open_clip pretrained tag (downloads unless already in the hub cache)."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ValueError(
            f"run-config 'pretrained' = {tag!r} is neither 'public-pretrain', 'none', a "
            f"checkpoint file, nor an open_clip tag of {name} ({', '.join(tags) or 'none'})"
        )
    return open_clip.create_model(name, pretrained=tag, output_dict=True)
