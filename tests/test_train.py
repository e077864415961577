import numpy as np
import pytest
import torch

from fedmm import lora
from fedmm import model as models
from fedmm.data import load_splits, to_batch
from fedmm.pretrain import base_checkpoint_path, load_base_model
from fedmm.train import proximal_term, train_steps


@pytest.fixture(scope="module")
def client_batch(tokenizer):
    ds = load_splits("digits")["clients"].select(range(64))
    return to_batch(ds, tokenizer, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 32)


def test_lora_training_lowers_clip_loss_and_touches_only_the_adapter(base_model, client_batch):
    net = lora.attach_lora(base_model, 8, 16.0, ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"])
    frozen = {k: v.clone() for k, v in net.get_base_model().state_dict().items() if "lora_" not in k}
    first = train_steps(net, client_batch, steps=1, batch_size=32, lr=0.0, seed=0)
    stats = train_steps(net, client_batch, steps=30, batch_size=32, lr=3e-3, seed=0)
    last = train_steps(net, client_batch, steps=1, batch_size=32, lr=0.0, seed=0)
    assert stats.steps == 30 and stats.examples_seen == 960
    assert last.clip_loss < 0.8 * first.clip_loss
    for k, v in net.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), f"frozen base tensor {k} changed"


def test_proximal_term_is_half_mu_squared_distance():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    model = torch.nn.Module()
    model.w = w
    anchor = [torch.tensor([0.0, 2.0, 1.0])]
    term = proximal_term(anchor, mu=0.5)(model, {}, None)
    assert torch.isclose(term, torch.tensor(0.5 / 2 * (1 + 0 + 4)))  # squared norm, not the norm
    term.backward()
    assert torch.allclose(w.grad, 0.5 * (w.detach() - anchor[0]))


def test_base_is_cached_and_identical_on_every_load(base_settings, _base_model):
    path = base_checkpoint_path(base_settings)
    assert path.is_file() and path.suffix == ".safetensors"
    again = load_base_model(base_settings, progress=False)
    for (k, a), (_, b) in zip(_base_model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in again.parameters())


def test_local_checkpoint_round_trip(tmp_path, _base_model):
    path = tmp_path / "copy.safetensors"
    models.save_checkpoint(_base_model, path)
    net = models.create_model("fedmm-tiny-vit", seed=9)
    models.load_checkpoint(net, path)
    for (k, a), (_, b) in zip(_base_model.state_dict().items(), net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # A checkpoint of another architecture is refused, not half-loaded.
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        models.load_checkpoint(net, tmp_path / "other.pt")
    assert np.isfinite(sum(float(p.sum()) for p in net.parameters()))
