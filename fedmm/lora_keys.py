"""How LoRA tensors are named on the wire (peft's keys), shared by clients and strategies.

No torch here: strategies import it and stay model-agnostic.

- ``<layer>.lora_A.weight``: A, (r, in) or (r, in, 1, 1) for a 1x1 conv;
- ``<layer>.lora_B.weight``: B, (out, r) or (out, r, 1, 1);
- downlink-only (server -> client, never in a reply): a frozen update the
  client adds, times the LoRA scale, to the layer's base weight, either as
  factors ``<layer>.lora_frozen_B @ <layer>.lora_frozen_A`` or dense
  ``<layer>.lora_frozen_W`` (FLoRA's merge).
"""

from __future__ import annotations

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
FROZEN_A, FROZEN_B, FROZEN_W = ".lora_frozen_A", ".lora_frozen_B", ".lora_frozen_W"
DOWNLINK_ONLY = (FROZEN_A, FROZEN_B, FROZEN_W)
RANK_METRIC = "lora-rank"  # a reply's metric: the client's own rank


def is_downlink_only(key: str) -> bool:
    return key.endswith(DOWNLINK_ONLY)


def rank_of(arrays) -> int:
    """The LoRA rank of named arrays (numpy or Flower ``Array``): rows of the first A factor."""
    for key in arrays.keys():
        if key.endswith(A_SUFFIX):
            return int(arrays[key].shape[0])
    raise ValueError("the arrays hold no LoRA adapter (no '*.lora_A.weight')")


def layer_of(key: str) -> str:
    for suffix in (A_SUFFIX, B_SUFFIX, *DOWNLINK_ONLY):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"'{key}' is not a LoRA key")
