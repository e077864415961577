"""Differential privacy: the guarantees' assumptions, accounting, clipping and noise."""

from collections import OrderedDict

import numpy as np
import open_clip
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus import GradSampleModule
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from clients.privacy_mod import load_ledger, privacy_mod, store_ledger
from fedmm import lora
from fedmm import protocol
from fedmm.secagg.plan import SecAggPlan
from fedmm.config import ConfigError, Settings
from fedmm.data import load_splits, to_batch
from fedmm.privacy import (
    PublicNegativesLoss,
    gaussian_epsilon,
    privatize_update,
    sample_epsilon,
    sample_rate,
    train_dp_sgd,
    update_norm,
)
from server.chain import make_strategy
from fedmm.privacy.plan import privacy_plan
from server.history import MetricsHistory
from fedmm.privacy import accounting as dp_keys
from fedmm.protocol import to_record

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.fixture(scope="module")
def adapted(_base_model, base_settings):
    import copy

    torch.manual_seed(0)
    net = lora.attach_lora(copy.deepcopy(_base_model), 4, 8.0, base_settings.lora_target_list)
    with torch.no_grad():  # a non-zero B, so every LoRA tensor has a gradient
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    # train mode (Opacus records activations only then); the tiny model has no dropout, so removing
    # an example cannot shift other examples' random masks
    net.train()
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in net.modules())
    return net


@pytest.fixture(scope="module")
def public_and_batch(base_settings, tokenizer, _base_model):
    from fedmm import model as models

    splits = load_splits(base_settings.dataset)
    mean, std, size = models.image_mean_std(_base_model)
    public = to_batch(splits["public"].select(range(64)), tokenizer, mean, std, size)
    batch = to_batch(splits["clients"].select(range(6)), tokenizer, mean, std, size)
    return public, batch


def _per_sample_grads(net, batch, loss_of) -> dict[str, torch.Tensor]:
    gsm = GradSampleModule(net, loss_reduction="sum")
    try:
        out = gsm(batch.images, batch.tokens)
        loss_of(out, batch).backward()
        grads = {n: p.grad_sample.detach().clone() for n, p in gsm.named_parameters() if p.requires_grad}
    finally:
        gsm.zero_grad(set_to_none=True)
        gsm._close()
    return grads


def _removal_change(net, batch, loss_of, removed: int = 2) -> float:
    """Largest relative change of any other example's per-sample gradient when one example is removed."""
    full = _per_sample_grads(net, batch, loss_of)
    keep = torch.tensor([i for i in range(len(batch)) if i != removed])
    reduced = _per_sample_grads(net, batch.subset(keep), loss_of)
    worst = 0.0
    for name, g in full.items():
        before, after = g[keep], reduced[name]
        scale = before.flatten(1).norm(dim=1).clamp_min(1e-12)
        worst = max(worst, float(((before - after).flatten(1).norm(dim=1) / scale).max()))
    return worst


def test_public_negatives_make_per_sample_gradients_independent(adapted, public_and_batch):
    public, batch = public_and_batch

    def loss_of(out, b):  # a fresh loss per pass: both passes draw the same public pairs
        return PublicNegativesLoss(adapted, public, 32, seed=0, reduction="sum")(out, b)

    assert len(_per_sample_grads(adapted, batch, loss_of)) == len(lora.trainable_parameters(adapted))
    assert _removal_change(adapted, batch, loss_of) < 1e-5


def test_clip_loss_couples_samples_so_the_check_can_fail(adapted, public_and_batch):
    """The same check on open_clip's in-batch ClipLoss finds the coupling DP-SGD must not have."""
    _, batch = public_and_batch
    clip = open_clip.ClipLoss()

    def clip_sum(out, _batch):
        return clip(out["image_features"], out["text_features"], out["logit_scale"]) * len(out["image_features"])

    assert _removal_change(adapted, batch, clip_sum) > 0.01


def test_public_negatives_loss_masks_same_class_pairs_and_reduces(adapted, public_and_batch):
    public, batch = public_and_batch
    with torch.no_grad():
        out = adapted(batch.images, batch.tokens)
    per_sample = PublicNegativesLoss(adapted, public, 16, seed=3, reduction="none")(out, batch)
    assert per_sample.shape == (len(batch),) and bool(torch.isfinite(per_sample).all() and (per_sample > 0).all())
    assert torch.isclose(PublicNegativesLoss(adapted, public, 16, seed=3)(out, batch), per_sample.mean())
    # public pairs of the sample's own class are not negatives: with only those, the loss is zero
    own = public.subset(torch.nonzero(public.labels == batch.labels[0]).flatten())
    only_own = PublicNegativesLoss(adapted, own, 8, reduction="none")(out, batch)
    assert float(only_own[0]) == 0.0 and bool((only_own[batch.labels != batch.labels[0]] > 0).all())


@pytest.mark.parametrize("q,sigma,steps", [(0.2, 1.0, 60), (1.0, 2.0, 12), (0.05, 0.8, 400)])
def test_epsilon_equals_opacus_rdp_analysis(q, sigma, steps):
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    expected, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)
    assert sample_epsilon([(sigma, q, steps)], 1e-5) == pytest.approx(expected, rel=1e-9)
    # a ledger carried round by round through context.state gives the same epsilon as one accountant
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for _ in range(4):
        store_ledger(context, load_ledger(context) + [(sigma, q, steps // 4)])
    assert sample_epsilon(load_ledger(context), 1e-5) == pytest.approx(expected, rel=1e-9)


def test_flower_client_level_accountant_agrees_with_opacus():
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    accountant = dp_keys.client_level_accountant(1e-5, population=10, max_epsilon=None)
    for rounds in range(1, 6):
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.2, sample_size=10, population_size=10))
        # two RDP implementations, different order grids: equal to well under one percent
        assert accountant.get_epsilon(1e-5) == pytest.approx(gaussian_epsilon(1.2, rounds, 1e-5), rel=5e-3)
    assert dp_keys.rounds_allowed(1.2, 1e-5, 10, gaussian_epsilon(1.2, 3, 1e-5) + 1e-9, 10) == 3


def test_dp_sgd_ledger_counts_every_step_at_opacus_sample_rate(adapted, public_and_batch, base_settings, tokenizer,
                                                               _base_model):
    import copy

    from fedmm import model as models

    public, _ = public_and_batch
    splits = load_splits(base_settings.dataset)
    data = to_batch(splits["clients"].select(range(50)), tokenizer, *models.image_mean_std(_base_model))
    net = copy.deepcopy(adapted)
    before = [p.detach().clone() for p in lora.trainable_parameters(net)]
    stats, ledger = train_dp_sgd(net, data, PublicNegativesLoss(net, public, 16), steps=5, batch_size=16, lr=1e-2,
                                 noise_multiplier=1.1, max_grad_norm=0.5, history=[(1.1, 0.25, 7)])
    q = sample_rate(50, 16)
    assert q == 0.25 and stats.steps == 5
    assert sample_epsilon(ledger, 1e-5) == pytest.approx(sample_epsilon([(1.1, q, 12)], 1e-5), rel=1e-12)
    after = lora.trainable_parameters(net)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())  # Opacus's hooks are gone


def test_privatize_update_clips_then_adds_the_configured_noise():
    rng = np.random.default_rng(0)
    big = OrderedDict(a=rng.normal(0, 1, (300, 200)).astype(np.float32), b=rng.normal(0, 1, 5000).astype(np.float32))
    small = OrderedDict((k, v * 1e-4) for k, v in big.items())
    for delta in (big, small):
        clipped = privatize_update(delta, clip_norm=0.7, noise_std=0.0, rng=rng)
        assert update_norm(clipped) <= 0.7 * (1 + 1e-6)
    np.testing.assert_allclose(privatize_update(small, 0.7, 0.0, rng)["a"], small["a"])  # inside the ball: untouched
    zero = OrderedDict(a=np.zeros((400, 500), np.float32))
    noise = privatize_update(zero, clip_norm=1.0, noise_std=0.03, rng=rng)["a"]
    # 200,000 draws: the sample std is within 1% of 0.03 with overwhelming probability
    assert abs(noise.std() / 0.03 - 1) < 0.01 and abs(noise.mean()) < 0.03 * 0.01


def _mod_call(config: dict, delta: np.ndarray, context: Context | None = None):
    context = context or Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    global_arrays = to_record(OrderedDict(w=np.zeros(delta.shape, np.float32)))
    content = RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1, **config})})
    msg = Message(content=content, dst_node_id=3, message_type=MessageType.TRAIN)

    def handler(m: Message, _ctx: Context) -> Message:
        reply_arrays = to_record(OrderedDict(w=(m.content["arrays"]["w"].numpy() + delta).astype(np.float32)))
        from flwr.app import MetricRecord

        return Message(RecordDict({"arrays": reply_arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)

    return privacy_mod(msg, context, handler), context


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def test_distributed_dp_clips_and_leaves_the_noise_to_the_integer_share(task_identity):
    """Under dp = distributed the privacy mod clips to C and adds no float noise: the noise is the Skellam
    share secagg_mod adds inside the masked sum (tests/test_secagg_rounds.py measures it)."""
    clip = 0.5
    config = {protocol.DP_MODE: "distributed", protocol.DP_CLIP_NORM: clip, protocol.DP_NOISE_MULTIPLIER: 0.8,
              protocol.DP_NOISE_SHARES: 4}
    reply, _ = _mod_call(config, np.full(100_000, 3.0, np.float32))
    w = reply.content["arrays"]["w"].numpy()
    # the unclipped norm and whether clipping bound are the data's function with no noise: never sent
    assert not {"clipped", "update-norm"} & set(reply.content["metrics"])
    assert np.allclose(w, clip / np.sqrt(w.size), rtol=1e-5)  # clipped along (1, .., 1), nothing added


def test_local_dp_keeps_a_ledger_and_declines_when_the_budget_is_spent(task_identity):
    sigma = 2.0
    one = gaussian_epsilon(sigma / 2, 1, 1e-5)
    budget = gaussian_epsilon(sigma / 2, 2, 1e-5) + 1e-6  # room for exactly two releases
    config = {protocol.DP_MODE: "local", protocol.DP_CLIP_NORM: 1.0, protocol.DP_NOISE_MULTIPLIER: sigma,
              protocol.DP_DELTA: 1e-5, protocol.DP_MAX_EPSILON: budget}
    reply, context = _mod_call(config, np.ones(10, np.float32))
    assert reply.content["metrics"]["dp-epsilon"] == pytest.approx(one)
    reply, context = _mod_call(config, np.ones(10, np.float32), context)
    assert reply.content["metrics"]["dp-epsilon"] == pytest.approx(budget, abs=1e-5)
    reply, context = _mod_call(config, np.ones(10, np.float32), context)
    assert reply.has_error() and "privacy budget spent" in reply.error.reason and "node 3" in reply.error.reason
    assert len(load_ledger(context)) == 2  # a declined round spends nothing


def _node_context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=3, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def test_local_dp_is_the_clients_the_server_cannot_ask_for_less(task_identity):
    """The node's floor (its node config) and the run's promise (dp = local) bind whatever the server sends."""
    local = {protocol.DP_MODE: "local", protocol.DP_CLIP_NORM: 1.0, protocol.DP_DELTA: 1e-5}
    floor = _node_context({protocol.NODE_MIN_NOISE_MULTIPLIER: 2.0})
    reply, _ = _mod_call({**local, protocol.DP_NOISE_MULTIPLIER: 0.5}, np.ones(10, np.float32), floor)
    assert reply.has_error() and "noise multiplier 0.5" in reply.error.reason and "below its floor 2" in \
        reply.error.reason and "dp-min-noise-multiplier" in reply.error.reason
    # the server omits the noise: the floor still binds (no raw update leaves the node)
    reply, _ = _mod_call({}, np.ones(10, np.float32), _node_context({protocol.NODE_MIN_NOISE_MULTIPLIER: 2.0}))
    assert reply.has_error() and "asks for no client-side noise" in reply.error.reason
    # a run promised local DP: a server that drops the noise key is declined even without a node floor
    promised = _node_context({}, {"dp": "local", "dp-noise-multiplier": 1.5})
    reply, _ = _mod_call({}, np.ones(10, np.float32), promised)
    assert reply.has_error() and "'dp' = 'local'" in reply.error.reason
    # distributed noise shares are below a local floor: each update alone carries sigma / sqrt(n)
    reply, _ = _mod_call({protocol.DP_MODE: "distributed", protocol.DP_CLIP_NORM: 1.0, protocol.DP_NOISE_MULTIPLIER: 2.0,
                          protocol.DP_NOISE_SHARES: 16}, np.ones(10, np.float32), floor)
    assert reply.has_error() and "noise multiplier 0.5" in reply.error.reason
    # at or above the floor: the noise actually added and the ledger both follow the multiplier used
    reply, context = _mod_call({**local, protocol.DP_NOISE_MULTIPLIER: 4.0}, np.zeros(200_000, np.float32), floor)
    noise = reply.content["arrays"]["w"].numpy()
    assert abs(noise.std() / 4.0 - 1) < 0.01
    assert reply.content["metrics"]["dp-epsilon"] == pytest.approx(gaussian_epsilon(2.0, 1, 1e-5))
    assert load_ledger(context) == [(2.0, 1.0, 1)]


def test_the_nodes_own_budget_and_delta_bind_too(task_identity):
    sigma = 2.0
    own = gaussian_epsilon(sigma / 2, 1, 1e-6) + 1e-6  # the node allows one release, at its own delta
    context = _node_context({protocol.NODE_MAX_EPSILON: own, protocol.NODE_DELTA: 1e-6})
    config = {protocol.DP_MODE: "local", protocol.DP_CLIP_NORM: 1.0, protocol.DP_NOISE_MULTIPLIER: sigma,
              protocol.DP_DELTA: 1e-3, protocol.DP_MAX_EPSILON: 0.0}
    reply, context = _mod_call(config, np.ones(10, np.float32), context)
    assert reply.content["metrics"]["dp-epsilon"] == pytest.approx(gaussian_epsilon(1.0, 1, 1e-6))
    reply, _ = _mod_call(config, np.ones(10, np.float32), context)
    assert reply.has_error() and "privacy budget spent" in reply.error.reason
    bad = _node_context({protocol.NODE_MIN_NOISE_MULTIPLIER: "lots"})
    reply, _ = _mod_call(config, np.ones(10, np.float32), bad)
    assert reply.has_error() and "node config 'dp-min-noise-multiplier' = 'lots'" in reply.error.reason


def test_central_client_clipping_runs_flowers_mod(task_identity):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    reply, _ = _mod_call({KEY_CLIPPING_NORM: 0.25}, np.full(64, 1.0, np.float32))
    assert update_norm({"w": reply.content["arrays"]["w"].numpy()}) == pytest.approx(0.25, rel=1e-5)


def _settings(**kw) -> Settings:
    return Settings.from_run_config({"model": "fedmm-tiny-vit", **kw})


def test_invalid_privacy_combinations_are_rejected_with_the_key():
    with pytest.raises(ConfigError, match="'loss' = 'clip' with 'dp' = 'dp-sgd'"):
        _settings(dp="dp-sgd", loss="clip")
    with pytest.raises(ConfigError, match="dp-noise-multiplier"):
        _settings(dp="local", **{"dp-noise-multiplier": 0.0})
    with pytest.raises(ConfigError, match="max-epsilon"):
        _settings(**{"max-epsilon": 3.0})
    with pytest.raises(ConfigError, match="'dp'"):
        _settings(dp="central")
    with pytest.raises(ValueError, match="uniform mean.*FedMedian"):
        make_strategy(_settings(dp="central-server", strategy="fedmedian"), MetricsHistory())
    assert _settings(dp="dp-sgd").objective == "public-negatives"
    assert _settings().objective == "clip"


def test_privacy_plan_limits_rounds_and_warns_about_delta():
    s = _settings(dp="central-server", **{"max-epsilon": gaussian_epsilon(1.0, 4, 1e-5) + 1e-9})
    rounds, notes = privacy_plan(s, 10)
    assert rounds == 4 and any("allows 4 of 10 rounds" in n for n in notes)
    with pytest.raises(ConfigError, match="one round at noise multiplier"):
        privacy_plan(_settings(dp="distributed", **{"max-epsilon": 0.1, "secure-aggregation": True}), 10,
                     SecAggPlan.of(10, 16, 0, 1.0, 1.0), 1000)
    # distributed DP plans with the Skellam bound of its integer code: never below the Gaussian epsilon
    skellam = SecAggPlan.of(10, 12, 0, 1.0, 1.0)
    budget = skellam.epsilon(1000, 3, 1e-5) + 1e-9
    assert budget > gaussian_epsilon(1.0, 3, 1e-5)
    rounds, _ = privacy_plan(_settings(dp="distributed", **{"max-epsilon": budget, "secure-aggregation": True}),
                             10, skellam, 1000)
    assert rounds == 3
    _, notes = privacy_plan(_settings(dp="central-server", **{"dp-delta": 0.2}), 10)
    assert any("dp-delta 0.2 >= 1/10" in n for n in notes)
    _, notes = privacy_plan(_settings(dp="dp-sgd", **{"dp-delta": 0.1}), 10)
    assert any("smallest client's examples" in n for n in notes)


@pytest.fixture(scope="module")
def default_model_case(default_model_settings):
    """The default model (frozen BatchNorm image trunk, MiniLM text tower) as DP-SGD trains it: attach_lora's
    modes (its dropout layers in eval mode), a non-zero B so every LoRA tensor has a gradient."""
    from fedmm import model as models
    from fedmm.pretrain import load_base_model

    base = load_base_model(default_model_settings, progress=False)
    torch.manual_seed(0)
    net = lora.attach_lora(base, 4, 8.0, default_model_settings.lora_target_list)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    assert not any(isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in net.modules())
    assert any("FrozenBatchNorm" in type(m).__name__ for m in net.modules())
    tokenizer = models.create_tokenizer(default_model_settings.model)
    splits = load_splits(default_model_settings.dataset)
    mean, std, size = models.image_mean_std(base)
    public = to_batch(splits["public"].select(range(64)), tokenizer, mean, std, size)
    batch = to_batch(splits["clients"].select(range(6)), tokenizer, mean, std, size)
    return net, public, batch


def test_public_negatives_keep_per_sample_gradients_independent_on_the_default_model(default_model_case):
    net, public, batch = default_model_case

    def loss_of(out, b):
        return PublicNegativesLoss(net, public, 32, seed=0, reduction="sum")(out, b)

    assert len(_per_sample_grads(net, batch, loss_of)) == len(lora.trainable_parameters(net))
    assert _removal_change(net, batch, loss_of) < 1e-5


def test_clip_loss_couples_samples_on_the_default_model_too(default_model_case):
    net, _, batch = default_model_case
    clip = open_clip.ClipLoss()

    def clip_sum(out, _batch):
        return clip(out["image_features"], out["text_features"], out["logit_scale"]) * len(out["image_features"])

    assert _removal_change(net, batch, clip_sum) > 0.01


def test_central_dp_composes_with_constraints_and_still_refuses_other_aggregates():
    """Flower's accounted DP wrapper needs FedAvg itself beneath it, so the constraints wrapper goes above it (it
    only adds multipliers and reads statistics): the noise stays calibrated to FedAvg's uniform mean. A strategy
    that aggregates otherwise is refused with constraints on as well."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from server.chain import find_wrapper
    from strategies.constraints import DualAscentConstraints

    chain = make_strategy(_settings(dp="central-server", constraints="group-gap"), MetricsHistory(), num_nodes=5)
    duals = find_wrapper(chain, DualAscentConstraints)
    dp = find_wrapper(chain, DifferentialPrivacyServerSideFixedClipping)
    assert duals is not None and find_wrapper(duals, DifferentialPrivacyServerSideFixedClipping) is dp
    assert type(dp.strategy) is FedAvg
    with pytest.raises(ValueError, match="uniform mean.*FedMedian"):
        make_strategy(_settings(dp="central-server", constraints="group-gap", strategy="fedmedian"),
                      MetricsHistory(), num_nodes=5)
