import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmm import lora
from fedmm import model as models
from fedmm.config import ConfigError, Settings
from fedmm.data import Batch, load_splits, to_batch
from fedmm.pretrain import base_checkpoint_path, load_base_model
from fedmm.privacy import PublicNegativesLoss
from fedmm.losses import UniCLLoss, client_objective, clip_objective
from fedmm.train import local_optimizer, proximal_term, train_steps


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


def test_sgd_local_optimizer_steps_by_lr_times_the_gradient_and_adamw_does_not():
    """QFedAvg's L = 1/lr reads an SGD update as lr x gradient; AdamW's first step is ~lr x sign(gradient)."""
    grad = torch.tensor([4.0, -0.5, 0.01])
    steps = {}
    for name in ("sgd", "adamw"):
        w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        opt = local_optimizer([w], name, lr=0.1)
        w.grad = grad.clone()
        opt.step()
        steps[name] = (w.detach() - torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(steps["sgd"], -0.1 * grad)
    torch.testing.assert_close(steps["adamw"], -0.1 * torch.sign(grad), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="'adam'"):
        local_optimizer([w], "adam", lr=0.1)
    with pytest.raises(ConfigError, match="'local-optimizer'"):
        Settings.from_run_config({"local-optimizer": "adam"})


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


def _pairs(labels: list[int], captions: list[int] | None = None) -> tuple[dict[str, torch.Tensor], Batch]:
    """Random normalised image/text features for len(labels) pairs; caption i's tokens are [captions[i], 0]."""
    n = len(labels)
    gen = torch.Generator().manual_seed(len(labels))
    out = {"image_features": F.normalize(torch.randn(n, 8, generator=gen), dim=-1),
           "text_features": F.normalize(torch.randn(n, 8, generator=gen), dim=-1), "logit_scale": torch.tensor(5.0)}
    ids = captions if captions is not None else list(range(n))
    tokens = torch.tensor([[c + 1, 0] for c in ids])
    return out, Batch(torch.zeros(n, 3, 2, 2), tokens, torch.tensor(labels), torch.zeros(n, dtype=torch.long))


def test_unicl_is_clip_loss_when_every_pair_is_its_own_class():
    out, batch = _pairs([3, 1, 4, 0, 5, 9])
    assert torch.isclose(UniCLLoss()(out, batch), clip_objective()(out, batch), atol=1e-6)
    unlabelled = Batch(batch.images, batch.tokens, torch.full((6,), -1), batch.groups)  # distinct captions
    assert torch.isclose(UniCLLoss()(out, unlabelled), clip_objective()(out, batch), atol=1e-6)


def test_unicl_targets_are_uniform_over_the_batch_pairs_of_the_same_class():
    labels = [0, 0, 1, 2, 2, 2]
    out, batch = _pairs(labels)
    logits = (5.0 * out["image_features"] @ out["text_features"].T).tolist()
    expected = 0.0
    for i in range(6):  # written out: image i's (caption i's) mean log-probability of its class's captions (images)
        same = [j for j in range(6) if labels[j] == labels[i]]
        row_norm = math.log(sum(math.exp(v) for v in logits[i]))
        col_norm = math.log(sum(math.exp(logits[k][i]) for k in range(6)))
        expected += -sum(logits[i][j] - row_norm for j in same) / len(same) / 12
        expected += -sum(logits[j][i] - col_norm for j in same) / len(same) / 12
    assert float(UniCLLoss()(out, batch)) == pytest.approx(expected, rel=1e-5)


def test_unicl_does_not_care_which_same_class_caption_came_with_an_image():
    """Nothing in an image says which of its class's random captions it came with: shuffling them within a
    class leaves UniCL unchanged. ClipLoss scores the shuffle differently (it wants each image's own caption)."""
    out, batch = _pairs([0, 0, 0, 1, 1])
    perm = torch.tensor([2, 0, 1, 4, 3])  # captions moved between images of the same class only
    shuffled = {**out, "text_features": out["text_features"][perm]}
    assert torch.isclose(UniCLLoss()(shuffled, batch), UniCLLoss()(out, batch), atol=1e-6)
    assert not torch.isclose(clip_objective()(shuffled, batch), clip_objective()(out, batch), atol=1e-3)


def test_unicl_without_labels_pairs_identical_captions_only():
    out, batch = _pairs([-1, -1, -1, 2], captions=[7, 7, 8, 9])
    assert batch.same_class(batch).tolist() == [
        [True, True, False, False], [True, True, False, False], [False, False, True, False],
        [False, False, False, True]]
    relabelled = Batch(batch.images, batch.tokens, torch.tensor([0, 0, 1, 2]), batch.groups)
    assert torch.isclose(UniCLLoss()(out, batch), UniCLLoss()(out, relabelled), atol=1e-6)


class _CaptionTable(torch.nn.Module):
    """A stand-in text tower: caption c (tokens [c + 1, 0]) has its own trainable feature row."""

    def __init__(self, rows: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(rows, 8, generator=torch.Generator().manual_seed(1)))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0] - 1]


def test_unicl_public_captions_join_the_image_to_text_side_with_gradient():
    out, batch = _pairs([0, 0, 1])
    model = _CaptionTable(10)
    public_labels = [0, 2, 3, 1]
    public = Batch(torch.zeros(4, 3, 2, 2), torch.tensor([[c + 1, 0] for c in range(5, 9)]),
                   torch.tensor(public_labels), torch.zeros(4, dtype=torch.long))
    loss = UniCLLoss(model, public, count=4, seed=0)(out, batch)  # all four drawn: their order does not matter
    img, txt = out["image_features"], out["text_features"]
    pub = F.normalize(model.table[5:9].detach(), dim=-1)
    labels, expected = [0, 0, 1], 0.0
    for i in range(3):  # image i against 3 batch + 4 public captions; caption i against the 3 images
        cands = torch.cat([txt, pub])
        cand_labels = labels + public_labels
        logits = (5.0 * img[i] @ cands.T).tolist()
        norm = math.log(sum(math.exp(v) for v in logits))
        same = [j for j in range(7) if cand_labels[j] == labels[i]]
        expected += -sum(logits[j] - norm for j in same) / len(same) / 6
        back = (5.0 * txt[i] @ img.T).tolist()
        norm = math.log(sum(math.exp(v) for v in back))
        same = [j for j in range(3) if labels[j] == labels[i]]
        expected += -sum(back[j] - norm for j in same) / len(same) / 6
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss.backward()  # unlike DP-SGD's public negatives, these captions are trained: other classes pushed away
    grad_rows = model.table.grad.norm(dim=1)
    assert bool((grad_rows[5:9] > 0).all()) and not grad_rows[:5].any()


def test_client_objective_builds_the_configured_loss():
    out, batch = _pairs([0, 0, 1])
    model = _CaptionTable(10)
    public = Batch(torch.zeros(4, 3, 2, 2), torch.tensor([[c + 1, 0] for c in range(5, 9)]),
                   torch.tensor([0, 2, 3, 1]), torch.zeros(4, dtype=torch.long))
    clip = client_objective(Settings.from_run_config({"loss": "clip"}), model, public)
    assert torch.isclose(clip(out, batch), clip_objective()(out, batch))
    in_batch = client_objective(Settings.from_run_config({"loss": "unicl", "public-captions": 0}), model)
    assert torch.isclose(in_batch(out, batch), UniCLLoss()(out, batch))
    with_public = client_objective(Settings.from_run_config({"loss": "unicl", "public-captions": 4}), model, public)
    assert isinstance(with_public, UniCLLoss) and with_public.count == 4
    assert not torch.isclose(with_public(out, batch), in_batch(out, batch))
    negatives = client_objective(Settings.from_run_config({"loss": "public-negatives", "dp-negatives": 3}), model, public)
    assert isinstance(negatives, PublicNegativesLoss) and negatives.count == 3
    with pytest.raises(ValueError, match="'unicl' draws public pairs"):
        client_objective(Settings.from_run_config({"loss": "unicl", "public-captions": 4}), model, None)


def test_unicl_lowers_loss_on_a_one_class_batch(base_model, client_batch):
    """A label-skewed client's batch: UniCL trains on it (its target is reachable), like ClipLoss on mixed ones."""
    net = lora.attach_lora(base_model, 8, 16.0, ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"])
    mixed = client_batch.subset(torch.arange(64))
    skewed = mixed.subset(torch.nonzero(mixed.labels <= 1).flatten())  # two digits only
    loss = UniCLLoss()
    before = train_steps(net, skewed, steps=1, batch_size=32, lr=0.0, seed=0, loss_fn=loss)
    train_steps(net, skewed, steps=20, batch_size=32, lr=3e-3, seed=0, loss_fn=loss)
    after = train_steps(net, skewed, steps=1, batch_size=32, lr=0.0, seed=0, loss_fn=loss)
    assert after.clip_loss < 0.5 * before.clip_loss


def test_dp_sgd_refuses_in_batch_losses_naming_the_key():
    for loss in ("clip", "unicl"):
        with pytest.raises(ConfigError, match=f"'loss' = '{loss}' with 'dp' = 'dp-sgd'"):
            Settings.from_run_config({"dp": "dp-sgd", "loss": loss})
    unicl = Settings.from_run_config({"loss": "unicl", "public-captions": 16})
    assert unicl.objective == "unicl" and unicl.public_draw == 16
    assert Settings.from_run_config({"dp": "dp-sgd", "dp-negatives": 8}).public_draw == 8
    assert Settings.from_run_config({}).public_draw == 0  # ClipLoss reads no public data
    assert Settings.from_run_config({"loss": "unicl"}).public_draw == 0  # in-batch by default
