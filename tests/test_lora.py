import copy
import logging

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch import nn

from fedmm import lora
from fedmm import model as models

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]


def _inputs(tokenizer, n=6):
    torch.manual_seed(1)
    texts = ["a handwritten seven", "number 3", "the digit 0 written by hand", "a messy two", "x", "a digit: nine"]
    return torch.randn(n, 3, 32, 32), tokenizer(texts[:n])


def test_attention_swap_matches_torch_mha_on_both_towers(tokenizer):
    net = models.create_model("fedmm-tiny-vit", seed=3).eval()
    images, tokens = _inputs(tokenizer)
    with torch.no_grad():
        ref = net(images, tokens)
        swapped = lora.swap_attention(copy.deepcopy(net))
        out = swapped(images, tokens)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    # The text tower runs with open_clip's causal mask, the image tower without one.
    assert torch.allclose(out["image_features"], ref["image_features"], atol=1e-6)
    assert torch.allclose(out["text_features"], ref["text_features"], atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_linear_attention_matches_mha_with_masks(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    new = lora.LinearMultiheadAttention.from_torch(mha)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    pad = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2])
    for kwargs in ({}, {"attn_mask": causal}, {"attn_mask": causal.isinf()}, {"key_padding_mask": pad}):
        ref = mha(x, x, x, need_weights=False, **kwargs)[0]
        out = new(x, x, x, need_weights=False, **kwargs)[0]
        assert torch.allclose(out, ref, atol=1e-6), kwargs


def test_lora_on_every_target_changes_outputs_and_gets_gradients(base_model, tokenizer):
    net = lora.attach_lora(base_model, 4, 8.0, TARGETS)
    images, tokens = _inputs(tokenizer)
    with torch.no_grad():
        before = net(images, tokens)
    # B starts at zero (adapter is a no-op); make each target's adapter non-zero
    # in turn and check that it alone moves the outputs of its tower.
    names = [n for n in lora.adapter_state(net) if "lora_B" in n]
    assert {n.split(".")[-3] for n in names} == set(TARGETS)
    assert any(n.startswith("base_model.model.visual.") for n in names)
    assert any(n.startswith("base_model.model.transformer.") for n in names)
    params = dict(net.named_parameters())
    for name in names:
        key = name.replace("lora_B.weight", "lora_B.default.weight")
        with torch.no_grad():
            # Random, not constant: a constant B adds the same value to every
            # feature dimension, which the following LayerNorm removes.
            params[key].normal_(0, 0.05)
            out = net(images, tokens)
            params[key].zero_()
        tower = "image_features" if ".visual." in name else "text_features"
        assert (out[tower] - before[tower]).abs().max() > 1e-4, f"LoRA on {name} has no effect"
    # Gradients reach every adapter tensor (A needs B != 0 to receive one).
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    out = net(images, tokens)
    (out["image_features"].sum() + out["text_features"].pow(2).sum()).backward()
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert "lora_" in n, f"non-adapter parameter {n} is trainable"
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None


def test_adapter_arrays_round_trip_exactly(base_model):
    net = lora.attach_lora(base_model, 8, 16.0, TARGETS)
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in lora.get_adapter_arrays(net).items()}
    lora.set_adapter_arrays(net, arrays)
    back = lora.get_adapter_arrays(net)
    assert list(back) == sorted(arrays)
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_set_adapter_arrays_rejects_wrong_names_and_shapes(base_model):
    net = lora.attach_lora(base_model, 4, 8.0, TARGETS)
    arrays = lora.get_adapter_arrays(net)
    first = next(iter(arrays))
    with pytest.raises(ValueError, match="shape"):
        lora.set_adapter_arrays(net, {**arrays, first: np.zeros((1, 1), np.float32)})
    wrong = dict(arrays)
    wrong["not.an.adapter"] = wrong.pop(first)
    with pytest.raises(ValueError, match="names differ"):
        lora.set_adapter_arrays(net, wrong)


def test_peft_export_import_is_exact(base_model, tokenizer, tmp_path):
    fresh = copy.deepcopy(base_model)
    net = lora.attach_lora(base_model, 4, 8.0, TARGETS)
    rng = np.random.default_rng(1)
    lora.set_adapter_arrays(
        net, {k: rng.normal(0, 0.02, size=v.shape).astype(np.float32) for k, v in lora.get_adapter_arrays(net).items()}
    )
    folder = lora.export_peft(net, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    loaded = lora.load_peft(fresh, folder)
    assert isinstance(loaded, PeftModel)
    for (k1, v1), (k2, v2) in zip(lora.adapter_state(net).items(), lora.adapter_state(loaded).items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    images, tokens = _inputs(tokenizer)
    with torch.no_grad():
        a, b = net(images, tokens), loaded(images, tokens)
    assert torch.equal(a["image_features"], b["image_features"])
    assert torch.equal(a["text_features"], b["text_features"])


def test_unknown_lora_target_is_a_clear_error(base_model):
    with pytest.raises(ValueError, match="lora-targets.*qkv"):
        lora.attach_lora(base_model, 4, 8.0, ["qkv"])


def test_adapter_is_small_fraction_of_model(base_model):
    total = sum(p.numel() for p in base_model.parameters())
    net = lora.attach_lora(base_model, 8, 16.0, TARGETS)
    adapter = sum(v.size for v in lora.get_adapter_arrays(net).values())
    assert adapter <= 0.05 * total


def test_factory_does_not_warn_that_the_model_is_random(caplog):
    # The base weights are loaded after the factory; open_clip's "initialized randomly" would mislead every run.
    with caplog.at_level(logging.WARNING):
        models.create_model("fedmm-tiny-vit")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    logging.warning("a later warning still reaches the log")
    assert "a later warning" in caplog.text
