"""The ClientApp's handlers, driven with real Flower Messages (no federation)."""

import numpy as np
import torch
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.app import app as client_app
from fedmm import lora
from fedmm.pretrain import load_base_model


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's runtime sets in a ClientApp process before any Message is built."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture(scope="module")
def run_config(base_settings):
    return {**base_settings.to_run_config(), "local-steps": 3}


@pytest.fixture(scope="module")
def global_arrays(base_settings):
    net = lora.attach_lora(load_base_model(base_settings, progress=False), 8, 16.0, base_settings.lora_target_list)
    return ArrayRecord(torch_state_dict=lora.adapter_state(net)), net


def _call(run_config, kind, arrays, config=None, pid=0):
    context = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 10},
                      state=RecordDict(), run_config=run_config)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **(config or {})})})
    msg = Message(content=content, dst_node_id=pid + 1, message_type=kind)
    return client_app(msg, context)


def test_train_reply_carries_only_the_adapter(run_config, global_arrays, _base_model):
    arrays, net = global_arrays
    reply = _call(run_config, MessageType.TRAIN, arrays)
    assert not reply.has_error(), reply.error
    out = reply.content["arrays"]
    assert list(out.keys()) == list(arrays.keys())
    assert all(".lora_A." in k or ".lora_B." in k for k in out.keys())
    full_bytes = sum(p.numel() * p.element_size() for p in _base_model.parameters())
    assert out.count_bytes() <= 0.05 * full_bytes
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["partition-id"] == 0
    assert metrics["bytes-uplink"] == out.count_bytes()
    changed = [not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(out.values(), arrays.values())]
    assert any(changed)


def test_fedprox_obligation_pulls_towards_global(run_config, global_arrays):
    arrays, _ = global_arrays

    def drift(mu):
        reply = _call(run_config, MessageType.TRAIN, arrays, {"proximal-mu": mu, "lr": 0.01})
        new = reply.content["arrays"].to_torch_state_dict()
        ref = arrays.to_torch_state_dict()
        return sum(float(((new[k] - ref[k]) ** 2).sum()) for k in ref)

    assert drift(1000.0) < 0.5 * drift(0.0)


def test_non_private_client_can_train_on_public_negatives(run_config, global_arrays):
    """loss='public-negatives' without DP: the client trains on that objective, and replies as with ClipLoss."""
    arrays, _ = global_arrays
    clip = _call(run_config, MessageType.TRAIN, arrays, pid=1)
    public = _call({**run_config, "loss": "public-negatives"}, MessageType.TRAIN, arrays, pid=1)
    assert not public.has_error(), public.error
    assert list(public.content["arrays"].keys()) == list(arrays.keys())
    before = arrays.to_torch_state_dict()
    after = {"clip": clip.content["arrays"].to_torch_state_dict(), "public": public.content["arrays"].to_torch_state_dict()}
    assert all(torch.isfinite(v).all() for v in after["public"].values())
    assert any(not torch.equal(after["public"][k], before[k]) for k in before)  # it trained
    assert any(not torch.equal(after["public"][k], after["clip"][k]) for k in before)  # on another loss
    assert public.content["metrics"]["contrastive-loss"] != clip.content["metrics"]["contrastive-loss"]


def test_a_node_with_a_different_base_refuses_to_train(run_config, global_arrays):
    arrays, _ = global_arrays
    # Flower's runtime turns the exception into an error reply with this reason.
    with pytest.raises(ValueError, match=r"differs from the server's \(0123456789abcdef\)"):
        _call(run_config, MessageType.TRAIN, arrays, {"base-fingerprint": "0123456789abcdef"})


def test_evaluate_reply_has_counts_not_predictions(run_config, global_arrays):
    """Fairness and toxicity leave a client as counts, which add up to its test split."""
    arrays, _ = global_arrays
    reply = _call(run_config, MessageType.EVALUATE, arrays, pid=5)  # a minority site (group-sites)
    m = reply.content["metrics"]
    n = {g: sum(v for k, v in m.items() if k.startswith(f"fair-n-g{g}-")) for g in (0, 1)}
    tp = {g: sum(v for k, v in m.items() if k.startswith(f"fair-tp-g{g}-")) for g in (0, 1)}
    assert m["num-examples"] == n[0] + n[1] == m["tox-images"] and n[1] > 0
    assert np.isclose(m["zs-acc"], (tp[0] + tp[1]) / m["num-examples"])
    assert sum(v for k, v in m.items() if k.startswith("fair-pred-")) == m["num-examples"]
    assert 0 <= m["tox-top1"] <= m["tox-images"]


def test_a_clients_evaluate_reply_carries_the_audit_on_its_own_held_out_split(run_config, global_arrays):
    """The audit (fedmm/audit.py) measured by the client on its split, under the same keys as the server's."""
    from fedmm import protocol

    arrays, _ = global_arrays
    m = _call(run_config, MessageType.EVALUATE, arrays, pid=5).content["metrics"]
    assert set(protocol.AUDIT_SCALARS) <= set(m)
    assert all(0.0 <= m[k] <= 1.0 for k in protocol.AUDIT_SCALARS if k != protocol.CONSISTENCY_COSINE)
    assert -1.0 <= m[protocol.CONSISTENCY_COSINE] <= 1.0 and m[protocol.CONSISTENCY_COSINE] != 0.0
    again = _call(run_config, MessageType.EVALUATE, arrays, pid=5).content["metrics"]
    assert all(again[k] == m[k] for k in protocol.AUDIT_SCALARS)  # fixed perturbations: the same every time


def test_constrained_train_reports_constraint_statistics(run_config, global_arrays):
    """Multipliers in the train config switch the constraint terms on; the reply counts what they measured."""
    arrays, _ = global_arrays
    reply = _call(run_config, MessageType.TRAIN, arrays, {"multiplier-group-gap": 0.0, "multiplier-toxicity": 0.0},
                  pid=5)
    assert not reply.has_error(), reply.error
    m = reply.content["metrics"]
    steps, batch = run_config["local-steps"], run_config["batch-size"]
    assert m["cstat-count-g0"] + m["cstat-count-g1"] == m["cstat-images"] == steps * min(batch, m["num-examples"])
    assert 0 <= m["cstat-correct-g1"] <= m["cstat-count-g1"] and m["cstat-count-g1"] > 0
    assert 0 <= m["cstat-toxic-top1"] <= m["cstat-images"]
    plain = _call(run_config, MessageType.TRAIN, arrays, pid=5).content["metrics"]
    assert not any(k.startswith("cstat-") for k in plain)


def test_train_reports_the_global_models_loss_before_training(run_config, global_arrays):
    """QFedAvg's obligation: train_loss = F_k(w_global) on the run's objective, not the post-training loss."""
    from clients.node import node_of as _node
    from fedmm.losses import UniCLLoss
    from fedmm.train import mean_loss

    arrays, net = global_arrays
    reply = _call(run_config, MessageType.TRAIN, arrays, {"batch-size": 32, "report-train-loss": True}, pid=2)
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 2, "num-partitions": 10},
                      state=RecordDict(), run_config=run_config)
    data = _node(context).train
    expected = mean_loss(net, data, 32)  # ClipLoss, the default objective
    metrics = reply.content["metrics"]
    assert np.isclose(metrics["train_loss"], expected, rtol=1e-5)
    assert not np.isclose(metrics["train_loss"], metrics["train-loss"])
    # Only computed when the server's strategy asks for it.
    plain = _call(run_config, MessageType.TRAIN, arrays, {"batch-size": 32}, pid=2)
    assert "train_loss" not in plain.content["metrics"]
    # With another client loss, F_k is that loss (UniCL differs from ClipLoss on this label-skewed client).
    unicl = _call({**run_config, "loss": "unicl", "public-captions": 0}, MessageType.TRAIN, arrays,
                  {"batch-size": 32, "report-train-loss": True}, pid=2).content["metrics"]
    expected_unicl = mean_loss(net, data, 32, UniCLLoss())
    assert np.isclose(unicl["train_loss"], expected_unicl, rtol=1e-5)
    assert not np.isclose(expected_unicl, expected, rtol=1e-3)


def test_default_model_batch_norm_is_unchanged_by_client_rounds(default_model_settings):
    """Federated training on effnet-lite0-minilm: the trunk's BatchNorm statistics never move."""
    from clients import node as client_module

    settings = default_model_settings
    assert settings.model == "effnet-lite0-minilm"
    fresh = load_base_model(settings, progress=False)
    run_config = {**settings.to_run_config(), "local-steps": 2, "batch-size": 8}
    net = lora.attach_lora(load_base_model(settings, progress=False), 8, 16.0, settings.lora_target_list)
    arrays = ArrayRecord(torch_state_dict=lora.adapter_state(net))
    for server_round in (1, 2):
        reply = _call(run_config, MessageType.TRAIN, arrays, {"server-round": server_round, "lr": 0.05})
        arrays = reply.content["arrays"]
    trained = next(iter(client_module._RUNS.values())).net(settings.profile_for(0))
    bn = {k: v for k, v in fresh.state_dict().items() if "running_" in k}
    assert len(bn) > 40
    after = trained.get_base_model().state_dict()
    for key, value in bn.items():
        assert torch.equal(after[key], value), key
    moved = [n for n, p in trained.named_parameters() if "lora_B" in n and ".trunk." in n and p.abs().sum() > 0]
    assert moved  # the image trunk's adapters did train


def test_a_profile_sets_rank_layers_budget_and_precision(run_config, global_arrays):
    """A 'phone' tier: rank 2 on two layer kinds, bf16, a time budget that allows one step of three."""
    arrays, _ = global_arrays
    profiled = {**run_config, "client-profiles": "phone: lora-rank=2 lora-targets=q_proj,v_proj time-budget=0.001 "
                                                 "precision=bf16 batch-size=8; server: lora-rank=8",
                "partition-profiles": "phone,server"}
    reply = _call(profiled, MessageType.TRAIN, arrays, pid=0)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["lora-rank"] == 2 and metrics["steps-done"] == 1
    assert metrics["work-fraction"] == pytest.approx(1 / 3)
    out = reply.content["arrays"]
    assert list(out.keys()) == list(arrays.keys())  # the global's names and shapes, whatever the tier
    for key, value in out.items():
        new, old = value.numpy(), arrays[key].numpy()
        assert new.shape == old.shape
        if ".q_proj." in key or ".v_proj." in key:  # trained at rank 2, zero-padded to the global's 8
            tail = new[2:] if ".lora_A." in key else new[:, 2:]
            assert not tail.any(), key
        else:  # layers the tier does not adapt come back as received
            np.testing.assert_array_equal(new, old, err_msg=key)
    # the global's B is zero, so one step moves B (A's gradient is B-weighted): the tier's layers did train
    assert any(not np.array_equal(out[k].numpy()[:, :2], arrays[k].numpy()[:, :2])
               for k in out.keys() if ".lora_B." in k and (".q_proj." in k or ".v_proj." in k))
    # partition 1 is a 'server': the run's targets, full rank, every planned step
    metrics = _call(profiled, MessageType.TRAIN, arrays, pid=1).content["metrics"]
    assert metrics["lora-rank"] == 8 and metrics["steps-done"] == 3 and metrics["work-fraction"] == 1


def test_a_client_trains_the_steps_and_batch_the_server_asks_for_unless_its_tier_sets_less(run_config,
                                                                                          global_arrays):
    arrays, _ = global_arrays
    asked = {"local-steps": 2, "batch-size": 4}
    assert _call(run_config, MessageType.TRAIN, arrays, config=asked).content["metrics"]["steps-done"] == 2
    tiered = {**run_config, "client-profiles": "small: local-steps=1", "partition-profiles": "small"}
    metrics = _call(tiered, MessageType.TRAIN, arrays, config=asked).content["metrics"]
    assert metrics["steps-done"] == 1 and metrics["work-fraction"] == 1
    # the server's batch size reaches training: under DP-SGD a smaller batch samples less, so the same
    # steps spend less of the client's own budget
    private = {**run_config, "dp": "dp-sgd", "dp-noise-multiplier": 1.0}
    small, full = (_call(private, MessageType.TRAIN, arrays, config=c).content["metrics"]["dp-epsilon"]
                   for c in (asked, {"local-steps": 2}))
    assert 0 < small < full


def test_a_profile_that_drops_out_declines_with_a_reason(run_config, global_arrays):
    arrays, _ = global_arrays
    flaky = {**run_config, "client-profiles": "flaky: dropout=0.999", "partition-profiles": "flaky"}
    reply = _call(flaky, MessageType.TRAIN, arrays, pid=3)
    assert reply.has_error() and "profile 'flaky' dropped out of round 1" in reply.error.reason


def test_a_client_with_nothing_usable_declines_with_a_reason(run_config, base_settings, global_arrays, tmp_path):
    """Site 1's images are all missing but one: it declines the round, naming why, instead of failing it."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "label": i % 2, "client": "site0"})  # no captions: class prompts
    rows += [{"image": "img0.png", "caption": "the only one", "label": 0, "client": "site1"}]
    rows += [{"image": f"gone{i}.png", "caption": "lost", "label": 1, "client": "site1"} for i in range(3)]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    arrays, _ = global_arrays
    from fedmm.pretrain import ensure_base_checkpoint

    config = {**run_config, "dataset": str(manifest), "partitioner": "natural", "test-fraction": 0.25,
              "pretrained": str(ensure_base_checkpoint(base_settings, progress=False))}  # the bundled data's base

    def call(pid):
        context = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 2},
                          state=RecordDict(), run_config=config)
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        return client_app(Message(content=content, dst_node_id=pid + 1, message_type=MessageType.TRAIN), context)

    assert not call(0).has_error()  # site 0 trains on class-prompt captions
    reply = call(1)
    assert reply.has_error() and "partition 1:" in reply.error.reason and "usable training pair" in reply.error.reason


@pytest.mark.parametrize("config,named", [
    ({"lr": "fast"}, "'lr' = 'fast'"),
    ({"local-steps": 1e12}, "'local-steps'"),
    ({"batch-size": -3}, "'batch-size'"),
    ({"local-optimizer": "lion"}, "'local-optimizer'"),
    ({"codec-up": "q3"}, "'codec-up'"),
    ({"codec-down": "topk0.5+q8"}, "'codec-down' = 'topk0.5+q8' downlink codec 'topk0.5+q8': top-k would drop"),
    ({"proximal-mu": float("nan")}, "'proximal-mu'"),
    ({"multiplier-toxicity": float("inf")}, "'multiplier-toxicity'"),
    ({"server-round": 1.5}, "'server-round'"),
])
def test_a_malformed_instruction_gets_an_error_reply_naming_it(run_config, global_arrays, config, named):
    arrays, _ = global_arrays
    reply = _call(run_config, MessageType.TRAIN, arrays, config)
    assert reply.has_error() and named in reply.error.reason and "malformed train instruction" in reply.error.reason


def test_an_instruction_with_the_wrong_records_gets_an_error_reply(run_config):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 10},
                      state=RecordDict(), run_config=run_config)
    for content, named in [(RecordDict({"config": ConfigRecord({})}), "no 'arrays' record"),
                           (RecordDict({"arrays": ConfigRecord({"x": 1}), "config": ConfigRecord({})}), "'arrays' holds"),
                           (RecordDict({"arrays": ArrayRecord(), "config": ArrayRecord()}), "'config' holds")]:
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            reply = client_app(Message(content=content, dst_node_id=1, message_type=kind), context)
            assert reply.has_error() and named in reply.error.reason


def test_under_dp_a_train_reply_withholds_the_raw_losses(run_config, global_arrays):
    from fedmm import protocol
    from fedmm.privacy.release import WITHHELD_UNDER_DP

    arrays, _ = global_arrays
    plain = _call(run_config, MessageType.TRAIN, arrays).content["metrics"]
    assert "train-loss" in plain and "contrastive-loss" in plain
    local = {protocol.DP_MODE: "local", protocol.DP_CLIP_NORM: 1.0, protocol.DP_NOISE_MULTIPLIER: 1.0,
             protocol.DP_DELTA: 1e-5}
    reply = _call({**run_config, "dp": "local"}, MessageType.TRAIN, arrays, local)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert not set(WITHHELD_UNDER_DP) & set(metrics) and metrics["dp-epsilon"] > 0


def _site_folder(folder, labels, groups):
    import json

    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(len(labels))
    rows = []
    for i, (label, group) in enumerate(zip(labels, groups)):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"a photo of a {label}", "label": label, "group": group})
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "manifest.jsonl"


def test_a_site_trains_on_its_own_manifest_and_declines_labels_outside_the_runs_classes(
        run_config, base_settings, global_arrays, tmp_path):
    """Node config 'dataset': the node's own rows, string labels and groups by the run's lists; no 'classes' or
    an unknown label: it declines, naming why."""
    from fedmm.pretrain import ensure_base_checkpoint

    arrays, _ = global_arrays
    good = _site_folder(tmp_path / "site-a", ["cat", "dog", "cat", "bird", "dog", "cat"],
                        ["north", "south", "north", "north", "south", "north"])
    bad = _site_folder(tmp_path / "site-b", ["cat", "zebra", "dog"], ["north", "north", "south"])
    config = {**run_config, "classes": "cat,dog,bird", "groups": "south,north", "test-fraction": 0.34,
              "pretrained": str(ensure_base_checkpoint(base_settings, progress=False))}

    def call(manifest, kind=MessageType.TRAIN, cfg=config):
        context = Context(run_id=1, node_id=7, node_config={"dataset": str(manifest)}, state=RecordDict(),
                          run_config=cfg)
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        return client_app(Message(content=content, dst_node_id=7, message_type=kind), context)

    reply = call(good)
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] == 3  # its 6 rows, a third held out
    assert reply.content["metrics"]["partition-id"] == 7  # no partition-id: its node id names it
    evaluated = call(good, MessageType.EVALUATE).content["metrics"]
    assert evaluated["num-examples"] == 3
    declined = call(bad)
    assert declined.has_error() and "'zebra'" in declined.error.reason and "'classes'" in declined.error.reason
    unnamed = call(good, cfg={k: v for k, v in config.items() if k not in ("classes", "groups")})
    assert unnamed.has_error() and "names no 'classes'" in unnamed.error.reason


DP_RUNS = {  # every dp mode, as the server's chain configures its train instruction
    "none": {"dp": "none"},
    "none-secagg": {"dp": "none", "secure-aggregation": True},
    "dp-sgd": {"dp": "dp-sgd"},
    "dp-sgd-secagg": {"dp": "dp-sgd", "secure-aggregation": True},
    "local": {"dp": "local"},
    "central-client": {"dp": "central-client"},
    "central-server": {"dp": "central-server"},
    "distributed": {"dp": "distributed", "secure-aggregation": True},
    "local-ditto": {"dp": "local", "strategy": "ditto"},  # a method's personal-* evaluate metrics
}


@pytest.mark.parametrize("mode", list(DP_RUNS))
def test_every_metric_a_client_sends_under_dp_is_data_independent_or_listed_outside_the_guarantee(
        mode, run_config, global_arrays):
    """Audit item 2: the raw, unclipped update norm (and the clipped bit) left every client under local and
    distributed DP. Every metric of a train and an evaluate reply, under each dp mode (with constraints on where
    the mode allows them, so their statistics are sent too), must have a release rule: withheld, data-independent, or named in the
    report's outside-the-guarantee list. A metric added later without one fails here."""
    from fedmm.config import Settings
    from fedmm.privacy.plan import privacy_summary
    from fedmm.privacy.release import release_rule
    from server.chain import make_strategy
    from server.history import MetricsHistory

    arrays, _ = global_arrays
    constraints = {} if mode.startswith("dp-sgd") else {"constraints": "group-gap"}  # dp-sgd refuses them
    settings = Settings.from_run_config({**run_config, **DP_RUNS[mode], **constraints, "min-nodes": 2})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=4)

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3, 4]

    import random
    random.seed(0)
    train = next(iter(chain.configure_train(1, arrays, ConfigRecord({}), Grid())))
    evaluate = next(iter(chain.configure_evaluate(1, arrays, ConfigRecord({}), Grid())))
    sent, phases = {}, {}
    for msg in (train, evaluate):
        node = msg.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": 10},
                          state=RecordDict(), run_config=settings.to_run_config())
        reply = client_app(Message(content=msg.content, dst_node_id=node, message_type=msg.metadata.message_type),
                           context)
        assert not reply.has_error(), reply.error
        sent.update(dict(reply.content["metrics"]))
        phases[msg.metadata.message_type] = set(reply.content["metrics"].keys())
    assert "zs-acc" in sent and (mode.startswith("dp-sgd") or any(k.startswith("cstat-") for k in sent))  # both read
    if mode.endswith("ditto"):  # the method's own evaluate metrics were sent, so their rule is checked below
        assert any(k.startswith("personal-") for k in sent)
    # the keys the server expects of the run's clients (strategies/replies.py: never a vote) are exactly these
    from fedmm.privacy.release import EVALUATE_ALWAYS, EVALUATE_FAMILIES, TRAIN_FAMILIES, train_metric_keys
    expected = train_metric_keys(settings.dp, settings.secure_aggregation, False)
    assert {k for k in phases[MessageType.TRAIN] if not k.startswith(TRAIN_FAMILIES)} == expected
    assert {k for k in phases[MessageType.EVALUATE] if not k.startswith(EVALUATE_FAMILIES)} == set(EVALUATE_ALWAYS)
    if mode.startswith("none"):
        return
    unruled = sorted(k for k in sent if release_rule(k) is None)
    assert not unruled, f"dp = {mode}: these metrics leave the client with no release rule: {unruled}"
    listed = privacy_summary(settings, 4, [])["outside-guarantee"]
    for key in sent:
        rule = release_rule(key)
        assert rule.startswith("data-independent: ") or rule.removeprefix("outside the guarantee: ") in listed, key


def test_a_sites_images_decode_once_when_they_fit_and_per_batch_when_they_do_not(
        run_config, base_settings, global_arrays, tmp_path):
    """Node config 'decoded-images-mib': a site whose images fit decodes them once (no step waits for PIL) into the
    same pixels it would decode per batch; a file that stops decoding is named in the decline; a bad budget is
    named by its key."""
    from clients import node as nodes
    from fedmm.pretrain import ensure_base_checkpoint

    arrays, _ = global_arrays
    site = _site_folder(tmp_path / "site", ["cat", "dog", "cat", "bird", "dog", "cat"], ["north"] * 6)
    config = {**run_config, "classes": "cat,dog,bird", "groups": "north", "test-fraction": 0.34,
              "pretrained": str(ensure_base_checkpoint(base_settings, progress=False))}

    def node(**own):
        nodes._NODES.clear()
        return nodes.node_of(Context(run_id=1, node_id=7, node_config={"dataset": str(site), **own},
                                     state=RecordDict(), run_config=config))

    def train(**own):
        nodes._NODES.clear()
        context = Context(run_id=1, node_id=7, node_config={"dataset": str(site), **own}, state=RecordDict(),
                          run_config=config)
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        return client_app(Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN), context)

    decoded, per_batch = node(), node(**{"decoded-images-mib": 0})
    size = decoded.run.preprocess[2]
    assert not decoded.train.files and not decoded.test.files
    assert decoded.decoded_bytes == 6 * 3 * size * size * 4
    assert per_batch.train.files and per_batch.decoded_bytes == 0
    assert torch.equal(decoded.train.images, per_batch.train.images[torch.arange(len(per_batch.train))])
    assert node(**{"decoded-images-mib": 6 * 3 * size * size * 4 / 2**20 - 0.001}).train.files  # just too small
    trained = [train(), train(**{"decoded-images-mib": 0})]
    assert not any(r.has_error() for r in trained)
    assert trained[0].content["metrics"]["train-loss"] == trained[1].content["metrics"]["train-loss"]

    bad = train(**{"decoded-images-mib": "lots"})
    assert bad.has_error() and "node config 'decoded-images-mib' = 'lots'" in bad.error.reason
    image = site.parent / "img0.png"
    image.write_bytes(image.read_bytes()[:80])  # the header still parses (the manifest's probe); the pixels do not
    broken = train()
    assert broken.has_error() and str(image) in broken.error.reason and "could not be decoded" in broken.error.reason
    nodes._NODES.clear()


def test_image_files_decoded_a_batch_ahead_are_the_batches_decoded_in_line(tmp_path):
    from PIL import Image

    from fedmm.data import Batch
    from fedmm.data.images import ImageFiles
    from fedmm.train import draws, step_batches

    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(paths[-1])
    data = Batch(ImageFiles(paths, 8, (0.5,) * 3, (0.5,) * 3), torch.arange(7)[:, None], torch.arange(7),
                 torch.zeros(7, dtype=torch.long))
    cpu = torch.device("cpu")
    in_line = list(step_batches(data, draws(7, 3, 5, torch.Generator().manual_seed(1)), cpu, ahead=False))
    ahead = list(step_batches(data, draws(7, 3, 5, torch.Generator().manual_seed(1)), cpu, ahead=True))
    assert len(in_line) == len(ahead) == 5
    for a, b in zip(in_line, ahead):
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    stopped = step_batches(data, draws(7, 3, 5, torch.Generator().manual_seed(1)), cpu, ahead=True)
    next(stopped)
    stopped.close()  # a time budget ends training early: the decoding thread finishes and is joined
