import numpy as np
import torch
import torch.nn.functional as F
from open_clip_train.train import get_clip_metrics

from fedmm.data import Batch
from fedmm.evaluate import evaluate, retrieval_metrics, zero_shot_predictions


def _features(n=50, d=16, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + noise * torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_retrieval_metrics_equal_open_clip():
    for seed, noise in [(0, 0.5), (1, 1.0), (2, 3.0)]:
        img, txt = _features(seed=seed, noise=noise)
        ours = retrieval_metrics(img, txt, 14.3)
        ref = get_clip_metrics(img, txt, torch.tensor(14.3))
        for direction in ("image_to_text", "text_to_image"):
            short = "i2t" if direction == "image_to_text" else "t2i"
            for k in (1, 5, 10):
                assert ours[f"{short}-R@{k}"] == float(ref[f"{direction}_R@{k}"])
            assert np.isclose(ours[f"{short}-mean-rank"], ref[f"{direction}_mean_rank"])


def test_mrr_hand_computed():
    # Row i's paired text ranks 1st, 2nd, 3rd -> MRR = (1 + 1/2 + 1/3) / 3.
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.8, 0.5, 0.1]])
    txt = F.normalize(txt, dim=-1)
    logits = img @ txt.t()
    ranks = [(logits[i] > logits[i, i]).sum().item() for i in range(3)]
    expected = np.mean([1 / (r + 1) for r in ranks])
    assert np.isclose(retrieval_metrics(img, txt, 1.0)["i2t-mrr"], expected)
    assert sorted(ranks) != [0, 0, 0]  # the case is not trivial


class _FixedModel(torch.nn.Module):
    """Returns given features: evaluation is tested apart from any network."""

    def __init__(self, img, txt):
        super().__init__()
        self.img, self.txt = img, txt

    def forward(self, images, tokens):
        idx = images[:, 0, 0, 0].long()
        return {"image_features": self.img[idx], "text_features": self.txt[idx], "logit_scale": torch.tensor(10.0)}


def test_zero_shot_accuracy_overall_and_per_group():
    class_emb = torch.eye(3)
    img = F.normalize(torch.tensor([[1.0, 0.1, 0], [0, 1, 0], [0, 0.2, 1], [1, 0, 0], [0, 1, 0.1], [0.1, 0, 1]]), dim=-1)
    labels = torch.tensor([0, 1, 2, 1, 1, 0])  # predictions are 0,1,2,0,1,2
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    images = torch.arange(6).float().view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    data = Batch(images, torch.zeros(6, 4, dtype=torch.long), labels, groups)
    assert zero_shot_predictions(img, class_emb).tolist() == [0, 1, 2, 0, 1, 2]
    m = evaluate(_FixedModel(img, img), data, class_emb)
    assert np.isclose(m["zs-acc"], 4 / 6)
    assert np.isclose(m["zs-acc-group-0"], 1.0) and np.isclose(m["zs-acc-group-1"], 1 / 3)
    assert m["num-examples-group-0"] == 3


def test_grounding_is_zero_when_the_image_is_ignored_and_large_when_it_decides():
    """D(f(text, img), f(text, blank)): total variation between what an image and a blank image retrieve."""
    n, d = 6, 8
    txt = torch.eye(d)[:n]  # caption i lies along axis i
    images = torch.arange(1, n + 1).float().view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()  # the blank is all 0
    data = Batch(images, torch.zeros(n, 4, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                 torch.zeros(n, dtype=torch.long))
    blind = torch.ones(n + 1, d) / d**0.5  # every image, blank included, embeds the same
    assert evaluate(_FixedModel(blind, torch.cat([txt[:1], txt])), data, torch.eye(d))["grounding"] == 0.0
    # image i points at caption i; the blank at an axis no caption uses (uniform retrieval)
    seeing = torch.cat([torch.eye(d)[-1:], txt])
    m = evaluate(_FixedModel(seeing, torch.cat([txt[:1], txt])), data, torch.eye(d))
    with_image = torch.softmax(10.0 * torch.eye(n), dim=1)  # logit scale 10, cosine 1 on the pair, 0 elsewhere
    expected = 0.5 * (with_image - 1.0 / n).abs().sum(dim=1).mean()
    assert np.isclose(m["grounding"], float(expected)) and m["grounding"] > 0.8
