"""LoRA on open_clip via peft: attach, adapter arrays get/set, PEFT export.

open_clip's blocks use ``nn.MultiheadAttention``, whose forward never calls
its ``out_proj`` module (it reads the weight directly), so LoRA on it would
silently do nothing, and its fused ``in_proj_weight`` is not an ``nn.Linear``
peft can target. ``swap_attention`` replaces each one with
``LinearMultiheadAttention`` (plain q/k/v/out ``nn.Linear`` +
``scaled_dot_product_attention``), numerically equivalent, which peft and
Opacus both handle.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft import set_peft_model_state_dict
from torch import nn

from . import protocol as keys


class LinearMultiheadAttention(nn.Module):
    """Self/cross attention with separate q, k, v, out ``nn.Linear`` layers.

    Call-compatible with ``nn.MultiheadAttention`` as open_clip uses it
    (``need_weights=False``, additive float or boolean ``attn_mask``).
    """

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool = True, bias: bool = True):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> LinearMultiheadAttention:
        if not mha._qkv_same_embed_dim:
            raise ValueError("cross-attention with kdim/vdim != embed_dim is not supported")
        has_bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.batch_first, bias=has_bias)
        w = mha.in_proj_weight.detach()
        d = mha.embed_dim
        with torch.no_grad():
            for i, lin in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                lin.weight.copy_(w[i * d : (i + 1) * d])
                if has_bias:
                    lin.bias.copy_(mha.in_proj_bias.detach()[i * d : (i + 1) * d])
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if has_bias:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        return new.to(w.dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("LinearMultiheadAttention does not return attention weights")
        if not self.batch_first:  # (L, N, D) -> (N, L, D)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, _ = query.shape
        h, hd = self.num_heads, self.embed_dim // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, -1, h, hd).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = _merge_masks(attn_mask, key_padding_mask, n, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _merge_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """nn.MultiheadAttention mask semantics -> one additive SDPA mask (True = masked)."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask.view(n, -1, *mask.shape[-2:])
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(n, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    return mask


def clip_of(model: nn.Module) -> Any:
    """The open_clip model under a PEFT wrapper (or ``model`` itself). ``Any``: its towers are built from
    config, so their attributes (``encode_text``, ``visual.trunk``...) are not known to a type checker."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def swap_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` in place; returns it."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, LinearMultiheadAttention.from_torch(child))
    return model


def _adaptable(module: nn.Module) -> bool:
    """nn.Linear, or a 1x1 nn.Conv2d (a per-pixel linear map: LoRA's low-rank update
    is exact there and no padding or stride question arises)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def attach_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> PeftModel:
    """Swap attention, then wrap with peft LoRA; only adapter tensors are trainable.

    ``targets`` are module names (the last path component) of nn.Linear or 1x1
    nn.Conv2d layers; every module with such a name must be adaptable.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    swap_attention(model)
    modules = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if n]
    names = {name for name, m in modules if _adaptable(m)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"run-config 'lora-targets': no nn.Linear or 1x1 nn.Conv2d named {missing} in the model; "
            f"those layers are named {sorted(names)}"
        )
    odd = sorted({f"{name} ({type(m).__name__})" for name, m in modules if name in targets and not _adaptable(m)})
    if odd:
        raise ValueError(f"run-config 'lora-targets': {odd} share a target name but are not nn.Linear or 1x1 nn.Conv2d")
    # peft annotates lora_alpha as int, but scales by alpha / r in floating point; fedmm's lora-alpha is a float
    config = LoraConfig(r=rank, lora_alpha=cast(int, alpha), target_modules=targets, lora_dropout=0.0, bias="none")
    return get_peft_model(model, config)


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """The adapter tensors, in a stable (sorted) order, keyed by peft's names."""
    state = get_peft_model_state_dict(model)
    return OrderedDict((k, state[k]) for k in sorted(state))


def get_adapter_arrays(model: PeftModel) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in adapter_state(model).items())


def set_adapter_arrays(model: PeftModel, arrays: dict[str, np.ndarray]) -> None:
    """Load adapter arrays; names and shapes must match the model's exactly."""
    expected = adapter_state(model)
    if set(arrays) != set(expected):
        extra = sorted(set(arrays) - set(expected))[:3]
        missing = sorted(set(expected) - set(arrays))[:3]
        raise ValueError(f"adapter names differ: unexpected {extra}, missing {missing}")
    for k, ref in expected.items():
        if tuple(arrays[k].shape) != tuple(ref.shape):
            raise ValueError(f"adapter '{k}': shape {arrays[k].shape}, expected {tuple(ref.shape)}")
    tensors = {k: torch.as_tensor(np.asarray(v), dtype=expected[k].dtype) for k, v in arrays.items()}
    unexpected = list(getattr(set_peft_model_state_dict(model, tensors), "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"peft rejected adapter keys {unexpected[:3]}")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def export_peft(model: PeftModel, folder: str | Path) -> Path:
    """Write the adapter in PEFT's on-disk format (adapter_config.json + safetensors)."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_peft(base: nn.Module, folder: str | Path) -> PeftModel:
    """Inverse of ``export_peft`` on a fresh base model (attention swapped here)."""
    swap_attention(base)
    return PeftModel.from_pretrained(base, str(folder))


def adapter_rank(model: PeftModel) -> int:
    """The rank of the model's adapter."""
    return keys.rank_of(adapter_state(model))


def fit_rank(arrays: dict[str, np.ndarray], rank: int) -> OrderedDict[str, np.ndarray]:
    """The first ``rank`` components of every LoRA layer (rows of A, columns of B).

    Strategies order components so that this truncation is what a client of
    lower rank should train (see strategies/lora_factors.py).
    """
    out = OrderedDict()
    for key, value in arrays.items():
        if key.endswith(keys.A_SUFFIX):
            value = _resized(value, 0, rank)
        elif key.endswith(keys.B_SUFFIX):
            value = _resized(value, 1, rank)
        out[key] = value
    return out


pad_rank = fit_rank  # padding to a higher rank is the same resize: extra components are zero


def _resized(value: np.ndarray, axis: int, rank: int) -> np.ndarray:
    have = value.shape[axis]
    if have >= rank:
        return np.take(value, np.arange(rank), axis=axis)
    pad = [(0, 0)] * value.ndim
    pad[axis] = (0, rank - have)
    return np.pad(value, pad)


def load_global(model: PeftModel, arrays: dict[str, np.ndarray]) -> None:
    """Load a global adapter of any rank into ``model``, and its frozen update if any.

    LoRA factors are fitted to the model's own rank (``fit_rank``); a model
    adapting a subset of the global's layers loads those; downlink-only
    frozen updates (``fedmm.protocol``) are added, times the layer's LoRA
    scale, to the base weights as they were when first touched, so loading
    the next global replaces rather than accumulates.
    """
    frozen = {k: v for k, v in arrays.items() if keys.is_downlink_only(k)}
    adapter = {k: v for k, v in arrays.items() if not keys.is_downlink_only(k)}
    own = adapter_state(model).keys()
    if set(own) < set(adapter):  # a client whose profile adapts fewer layers takes its share of the global
        adapter = {k: adapter[k] for k in own}
    set_adapter_arrays(model, fit_rank(adapter, adapter_rank(model)))
    layers = {keys.layer_of(k) for k in frozen}
    touched: set[str] = getattr(model, "_fedmm_frozen_layers", set())
    for layer in sorted(layers | touched):
        module: Any = model.get_submodule(layer)  # a peft LoRA layer: get_base_layer(), scaling
        weight = module.get_base_layer().weight
        original = getattr(module, "_fedmm_base_weight", None)
        if original is None:
            original = module._fedmm_base_weight = weight.detach().clone()
        delta = torch.zeros_like(original)
        if layer in layers:
            if layer + keys.FROZEN_W in frozen:
                dense = torch.as_tensor(frozen[layer + keys.FROZEN_W], dtype=torch.float32)
            else:
                dense = torch.as_tensor(frozen[layer + keys.FROZEN_B], dtype=torch.float32) @ torch.as_tensor(
                    frozen[layer + keys.FROZEN_A], dtype=torch.float32)
            delta = module.scaling["default"] * dense.reshape(original.shape).to(original.device, original.dtype)
        with torch.no_grad():
            weight.copy_(original + delta)
    setattr(model, "_fedmm_frozen_layers", touched | layers)
