"""Fairness and toxicity: metrics against fairlearn and hand-computed cases, the classifier,
the surrogates' gradients, dual ascent, the wrapper, the bundled data's groups and toxic captions."""

import numpy as np
import pytest
import torch
from fairlearn.metrics import MetricFrame, demographic_parity_difference, equal_opportunity_difference
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from sklearn.metrics import accuracy_score

from fedmm import lora
from fedmm.config import ConfigError, Settings
from fedmm.constraints import (
    ConstraintTerm,
    constraint_values,
    dual_ascent,
    fairness_counts,
    fairness_from_counts,
    flag_toxic,
    group_fairness,
    soft_group_gap,
    toxic_mass,
    toxic_retrieval,
)
from fedmm.data import class_names, client_split, load_splits, to_batch, zero_shot_prompts
from fedmm.data.digits import CAPTION_TEMPLATES, CLASS_NAMES, TOXIC_TEMPLATES
from fedmm.evaluate import class_embeddings
from fedmm import model as models
from strategies.constraints import Constraint, DualAscentConstraints


def _predictions(seed=0, n=600, classes=10, groups=2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=n)
    group = (rng.random(n) < 0.3).astype(int) if groups == 2 else rng.integers(groups, size=n)
    # the minority is misclassified more often, so every gap is non-zero
    wrong = rng.random(n) < np.where(group == 1, 0.45, 0.15)
    preds = np.where(wrong, rng.integers(classes, size=n), labels)
    return labels, preds, group


def test_gaps_hand_computed():
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    preds = np.array([0, 0, 1, 1, 0, 1, 0, 0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    m = group_fairness(labels, preds, groups, num_classes=2)
    # group 0: 4/4 correct; group 1: 1/4
    assert m["zs-acc-group-0"] == 1.0 and m["zs-acc-group-1"] == 0.25
    assert m["acc-gap"] == 0.75 and m["worst-group-acc"] == 0.25
    # P(pred=0|g): 0.5 vs 0.75; P(pred=1|g): 0.5 vs 0.25 -> mean 0.25
    assert m["dp-gap"] == pytest.approx(0.25)
    # TPR class 0: 1 vs 0.5; class 1: 1 vs 0 -> mean 0.75
    assert m["eo-gap"] == pytest.approx(0.75)


def test_gaps_equal_fairlearn_and_federated_counts_equal_pooled():
    labels, preds, groups = _predictions()
    m = group_fairness(labels, preds, groups, num_classes=10)
    frame = MetricFrame(metrics=accuracy_score, y_true=labels, y_pred=preds, sensitive_features=groups)
    assert m["acc-gap"] == pytest.approx(frame.difference()) and m["acc-gap"] > 0.1
    assert m["worst-group-acc"] == pytest.approx(frame.group_min())
    dp = [demographic_parity_difference(labels == c, preds == c, sensitive_features=groups) for c in range(10)]
    eo = [equal_opportunity_difference(labels == c, preds == c, sensitive_features=groups) for c in range(10)]
    assert m["dp-gap"] == pytest.approx(np.mean(dp)) and m["eo-gap"] == pytest.approx(np.mean(eo))
    # three clients send counts; the server's sums give fairlearn's numbers on the pooled predictions
    summed: dict[str, float] = {}
    for part in np.array_split(np.arange(len(labels)), [100, 350]):
        for k, v in fairness_counts(labels[part], preds[part], groups[part], 10, 2).items():
            summed[k] = summed.get(k, 0) + v
    fed = fairness_from_counts(summed)
    for key in ("acc-gap", "worst-group-acc", "dp-gap", "eo-gap", "zs-acc-group-0", "zs-acc-group-1"):
        assert fed[key] == pytest.approx(m[key], abs=1e-12), key


def test_equal_opportunity_skips_classes_a_group_lacks():
    labels, preds, groups = _predictions(seed=1)
    keep = ~((labels == 3) & (groups == 1))  # group 1 has no true 3s: its TPR is undefined
    labels, preds, groups = labels[keep], preds[keep], groups[keep]
    m = group_fairness(labels, preds, groups, num_classes=10)
    eo = [equal_opportunity_difference(labels == c, preds == c, sensitive_features=groups) for c in range(10) if c != 3]
    assert m["eo-gap"] == pytest.approx(np.mean(eo))
    assert fairness_from_counts(fairness_counts(labels, preds, groups, 10, 2))["eo-gap"] == pytest.approx(np.mean(eo))


def test_toxic_retrieval_hand_computed():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 9.0]])
    toxic = torch.tensor([False, True, False])
    m = toxic_retrieval(logits, toxic)
    assert m["toxic-top1"] == 0.25  # only image 1 retrieves the toxic caption first
    p = torch.softmax(logits, dim=1)[:, 1]
    assert m["toxic-mass"] == pytest.approx(float(p.mean()))


def test_classifier_flags_toxic_captions_and_passes_benign_ones():
    assert flag_toxic(["a handwritten seven, you idiot", "what a stupid four"]).all()
    assert not flag_toxic(["a handwritten seven", "the digit 4 written by hand"]).any()
    toxic = [t.format(w=w, d=d) for t in TOXIC_TEMPLATES for d, w in enumerate(CLASS_NAMES)]
    clean = [t.format(w=w, d=d) for t in CAPTION_TEMPLATES for d, w in enumerate(CLASS_NAMES)]
    assert flag_toxic(toxic).all() and not flag_toxic(clean).any()


def test_bundled_data_toxic_flags_match_the_classifier():
    for split, ds in load_splits("digits").items():
        flags = np.asarray(ds["toxic"])
        assert (flag_toxic(ds["caption"]) == flags).all(), split
        assert (flags.mean() == 0) if split == "public" else (0.05 < flags.mean() < 0.15), split


def test_minority_group_is_concentrated_on_a_few_clients():
    clients = load_splits("digits")["clients"]
    minority = int(np.sum(clients["group"]))
    s = Settings.from_run_config({"group-sites": 0.3})
    holders, seen = [], 0
    for pid in range(10):
        train, test = client_split(s, clients, pid, 10)
        g = int(np.sum(train["group"])) + int(np.sum(test["group"]))
        seen += g
        holders += [pid] if g else []
    assert len(holders) == 3 and seen == minority  # every minority sample, on three clients only
    spread = Settings.from_run_config({"group-sites": 1.0})
    assert all(np.sum(client_split(spread, clients, pid, 10)[0]["group"]) > 0 for pid in range(10))


def test_surrogates_have_gradients():
    feats = torch.randn(8, 4, requires_grad=True)
    soft = torch.sigmoid(feats.sum(1))
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    gap = soft_group_gap(soft, groups)
    gap.backward()
    assert gap > 0 and feats.grad.abs().sum() > 0
    means = [float(soft[groups == g].mean()) for g in (0, 1)]
    assert float(gap) == pytest.approx(max(means) - min(means))
    # only the trailing group gets a gradient (descending lifts it); the leading group is not pushed down
    leading = int(np.argmax(means))
    assert feats.grad[groups == leading].abs().sum() == 0 and feats.grad[groups != leading].abs().sum() > 0
    logits = torch.randn(6, 6, requires_grad=True)
    mass = toxic_mass(logits, torch.tensor([True, False, False, True, False, False]))
    mass.backward()
    assert 0 < mass < 1 and logits.grad.abs().sum() > 0
    assert soft_group_gap(soft.detach().requires_grad_(), torch.zeros(8, dtype=torch.long)) == 0


def test_constraint_term_reaches_the_adapter(base_model, base_settings, tokenizer):
    net = lora.attach_lora(base_model, 4, 8.0, base_settings.lora_target_list)
    splits = load_splits("digits")
    ds = splits["clients"].select(range(24))
    batch = to_batch(ds, tokenizer, *models.image_mean_std(net), toxic=flag_toxic(ds["caption"]))
    prompts = zero_shot_prompts(class_names(ds))
    term = ConstraintTerm({"group-gap": 1.0, "toxicity": 1.0}, lambda: class_embeddings(net, tokenizer, prompts),
                          num_groups=3)
    out = net(batch.images, batch.tokens)
    loss = term(net, out, batch)
    loss.backward()
    grads = [p.grad for p in lora.trainable_parameters(net) if p.grad is not None]
    assert loss > 0 and grads and sum(float(g.abs().sum()) for g in grads) > 0
    stats = term.statistics()
    assert stats["cstat-count-g0"] + stats["cstat-count-g1"] == stats["cstat-images"] == 24
    assert stats["cstat-count-g2"] == 0  # every group's keys, seen or not: Flower aggregates equal key sets
    assert constraint_values(stats).keys() == {"group-gap", "toxicity"}


def test_dual_ascent_direction_and_projection():
    assert dual_ascent(1.0, value=0.15, threshold=0.05, step=2.0) == pytest.approx(1.2)  # violated: up
    assert dual_ascent(1.0, value=0.0, threshold=0.05, step=2.0) == pytest.approx(0.9)  # slack: down
    assert dual_ascent(0.05, value=0.0, threshold=0.05, step=2.0) == 0.0  # stops at zero, never negative
    m, trace = 0.0, []
    for value in (0.2, 0.2) + (0.01,) * 10:  # up 0.15 twice, then down 0.04 a round until it hits zero
        m = dual_ascent(m, value, 0.05, 1.0)
        trace.append(m)
    assert trace[1] > trace[0] > 0 and trace[2] < trace[1] and trace[-2] == trace[-1] == 0.0


def _reply(node: int, stats: dict, arrays: ArrayRecord) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": 10, **stats})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=request)


def test_wrapper_moves_multipliers_from_summed_statistics(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    wrapper = DualAscentConstraints(FedAvg(), {"group-gap": Constraint(0.05, 2.0), "toxicity": Constraint(0.01, 10.0)})
    arrays = ArrayRecord(numpy_ndarrays=[np.ones(3, dtype=np.float32)])
    # client 1: group 0 only, 90/100 right; client 2: 40/100 of group 1; no toxic retrievals beyond 5/200
    zero = {f"cstat-{k}": 0 for k in ("correct-g0", "count-g0", "correct-g1", "count-g1", "toxic-top1", "images")}
    replies = [
        _reply(1, {**zero, "cstat-correct-g0": 90, "cstat-count-g0": 100, "cstat-toxic-top1": 5, "cstat-images": 100},
               arrays),
        _reply(2, {**zero, "cstat-correct-g1": 40, "cstat-count-g1": 100, "cstat-images": 100}, arrays),
    ]
    wrapper.aggregate_train(1, replies)
    gap = 0.9 - 0.4  # measured over the summed counts, although no single client saw both groups
    assert wrapper.history[1]["constraints/group-gap"] == pytest.approx(gap)
    assert wrapper.multipliers["group-gap"] == pytest.approx(2.0 * (gap - 0.05))
    assert wrapper.multipliers["toxicity"] == pytest.approx(10.0 * (5 / 200 - 0.01))
    assert wrapper.history[1]["constraints/multiplier-group-gap"] == 0.0  # what round 1 trained with
    # a satisfied round lowers them, and they stop at zero
    good = [_reply(1, {"cstat-correct-g0": 50, "cstat-count-g0": 100, "cstat-correct-g1": 50, "cstat-count-g1": 100,
                       "cstat-toxic-top1": 0, "cstat-images": 200}, arrays)]
    for rnd in range(2, 12):  # 0.9 down by 2 * 0.05 a round
        wrapper.aggregate_train(rnd, good)
    assert wrapper.multipliers == {"group-gap": 0.0, "toxicity": 0.0}


def test_run_config_validation():
    with pytest.raises(ConfigError, match="'constraints'.*unknown constraint.*fairness"):
        Settings.from_run_config({"constraints": "group-gap,fairness"})
    with pytest.raises(ConfigError, match="'constraints' with 'dp' = 'dp-sgd'"):
        Settings.from_run_config({"constraints": "toxicity", "dp": "dp-sgd"})
    with pytest.raises(ConfigError, match="'max-group-gap'.*must be in \\[0, 1\\)"):
        Settings.from_run_config({"max-group-gap": 1.5})
    with pytest.raises(ConfigError, match="'dual-step-toxicity'.*must be > 0"):
        Settings.from_run_config({"dual-step-toxicity": -1.0})
    with pytest.raises(ConfigError, match="'group-sites'"):
        Settings.from_run_config({"group-sites": 0.0})
