"""LoRA-aware aggregation: heterogeneous ranks, exact products, best rank-r factors."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedmm import lora
from fedmm.config import ConfigError, Settings
from strategies import lora_factors as lf
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.svd_lora import SVDLoRA

RNG = np.random.default_rng(0)
LAYER = "base_model.model.blk.q_proj"
OUT, IN, R = 12, 10, 8


def _client(rank: int, conv: bool = False) -> OrderedDict:
    """A client's reply: its rank-``rank`` factors zero-padded to the global rank R."""
    a = RNG.normal(size=(rank, IN))
    b = RNG.normal(size=(OUT, rank))
    if conv:
        a, b = a[:, :, None, None], b[:, :, None, None]
    own = OrderedDict([(LAYER + lf.A_SUFFIX, a), (LAYER + lf.B_SUFFIX, b), ("other.bias", RNG.normal(size=3))])
    return lora.pad_rank(own, R)


def _global(conv: bool = False) -> OrderedDict:
    return _client(R, conv)


def test_padding_keeps_the_product_and_truncation_inverts_it():
    reply = _client(3)
    assert reply[LAYER + lf.A_SUFFIX].shape == (R, IN) and not reply[LAYER + lf.A_SUFFIX][3:].any()
    back = lora.fit_rank(reply, 3)
    assert back[LAYER + lf.B_SUFFIX].shape == (OUT, 3)
    np.testing.assert_array_equal(lf.product(reply[LAYER + lf.B_SUFFIX], reply[LAYER + lf.A_SUFFIX]),
                                  lf.product(back[LAYER + lf.B_SUFFIX], back[LAYER + lf.A_SUFFIX]))


@pytest.mark.parametrize("conv", [False, True])
def test_stacking_reproduces_the_weighted_sum_of_products(conv):
    replies = [_client(r, conv) for r in (2, 4, 8)]
    weights = [10.0, 30.0, 60.0]
    expected = sum(w * lf.product(c[LAYER + lf.B_SUFFIX], c[LAYER + lf.A_SUFFIX]) for w, c in zip(weights, replies))
    b_s, a_s = lf.stack_factors([c[LAYER + lf.B_SUFFIX] for c in replies], [c[LAYER + lf.A_SUFFIX] for c in replies],
                                weights)
    assert b_s.shape == (OUT, 3 * R)  # each padded to R; unpadded ranks would give 2+4+8
    np.testing.assert_allclose(b_s @ a_s, expected, rtol=1e-12, atol=1e-12)


def test_flora_merges_the_exact_mean_and_restarts_clients_from_fresh_adapters():
    strategy = FLoRA()
    strategy.current = _global()
    strategy.initial = OrderedDict(strategy.current)
    total = np.zeros((OUT, IN))
    for _ in range(3):  # rounds: the frozen update accumulates every round's exact mean
        replies, weights = [_client(r) for r in (2, 8)], [1.0, 3.0]
        out = strategy.combine(replies, weights, [2, 8], [LAYER])
        total += sum(w * lf.product(c[LAYER + lf.B_SUFFIX], c[LAYER + lf.A_SUFFIX]) for w, c in zip(weights, replies)) / 4
        frozen = (out[LAYER + lf.FROZEN_W] if LAYER + lf.FROZEN_W in out
                  else out[LAYER + lf.FROZEN_B].astype(np.float64) @ out[LAYER + lf.FROZEN_A].astype(np.float64))
        np.testing.assert_allclose(frozen, total, rtol=1e-5, atol=1e-5)  # float32 on the wire
        assert not out[LAYER + lf.B_SUFFIX].any()
        np.testing.assert_array_equal(out[LAYER + lf.A_SUFFIX], strategy.initial[LAYER + lf.A_SUFFIX])
    assert LAYER + lf.FROZEN_W in out  # 3 rounds x 16 ranks: dense (12 x 10) is now smaller


def test_svd_factors_are_the_best_rank_r_approximation():
    delta = RNG.normal(size=(OUT, IN))
    singular = np.linalg.svd(delta, compute_uv=False)
    b, a = lf.svd_factors(delta, 6)
    for r in (1, 3, 6):  # every prefix is itself optimal: clients of rank r truncate
        err = np.linalg.norm(delta - b[:, :r] @ a[:r])
        np.testing.assert_allclose(err, np.sqrt((singular[r:] ** 2).sum()), rtol=1e-10)  # Eckart-Young bound
        for _ in range(20):  # no other rank-r factorisation nearby does better
            bp = b[:, :r] + 1e-2 * RNG.normal(size=(OUT, r))
            ap = a[:r] + 1e-2 * RNG.normal(size=(r, IN))
            assert np.linalg.norm(delta - bp @ ap) >= err
    b_full, a_full = lf.svd_factors(delta, IN)
    np.testing.assert_allclose(b_full @ a_full, delta, atol=1e-10)


def test_svdlora_aggregate_is_the_truncated_mean_product():
    strategy = SVDLoRA()
    strategy.current = _global()
    replies, weights = [_client(r) for r in (4, 8, 8)], [2.0, 1.0, 1.0]
    out = strategy.combine(replies, weights, [4, 8, 8], [LAYER])
    mean = sum(w * lf.product(c[LAYER + lf.B_SUFFIX], c[LAYER + lf.A_SUFFIX]) for w, c in zip(weights, replies)) / 4
    singular = np.linalg.svd(mean, compute_uv=False)
    got = lf.product(out[LAYER + lf.B_SUFFIX], out[LAYER + lf.A_SUFFIX])
    np.testing.assert_allclose(np.linalg.norm(mean - got), np.sqrt((singular[R:] ** 2).sum()), rtol=1e-6, atol=1e-9)


def test_hetlora_weights_padded_factors_by_the_norm_of_their_product():
    """Cho et al.'s sparsity-weighted aggregation: weight ||B_i A_i||_F, the padding zeros count, per layer."""
    strategy = HetLoRA()
    strategy.current = _global()
    low, high = _client(2), _client(4)
    high[LAYER + lf.B_SUFFIX] = 3 * high[LAYER + lf.B_SUFFIX]  # a module that moved further weighs more
    norms = [np.linalg.norm(lf.product(c[LAYER + lf.B_SUFFIX], c[LAYER + lf.A_SUFFIX])) for c in (low, high)]
    w_low, w_high = norms[0] / sum(norms), norms[1] / sum(norms)
    assert w_high > 0.5
    out = strategy.combine([low, high], [100.0, 1.0], [2, 4], [LAYER])  # num-examples play no part here
    a, b = out[LAYER + lf.A_SUFFIX], out[LAYER + lf.B_SUFFIX]
    np.testing.assert_allclose(a[:2], w_low * low[LAYER + lf.A_SUFFIX][:2] + w_high * high[LAYER + lf.A_SUFFIX][:2])
    np.testing.assert_allclose(a[2:4], w_high * high[LAYER + lf.A_SUFFIX][2:4])  # shrunk by the low client's zeros
    np.testing.assert_allclose(b[:, 2:4], w_high * high[LAYER + lf.B_SUFFIX][:, 2:4])
    assert not a[4:].any() and not b[:, 4:].any()  # nobody trained these


def test_naive_factor_averaging_is_not_the_average_update():
    """What most federated-LoRA code does: mean(B) @ mean(A) != mean(B @ A)."""
    replies = [_client(R) for _ in range(4)]
    mean_b = np.mean([c[LAYER + lf.B_SUFFIX] for c in replies], axis=0)
    mean_a = np.mean([c[LAYER + lf.A_SUFFIX] for c in replies], axis=0)
    true = np.mean([lf.product(c[LAYER + lf.B_SUFFIX], c[LAYER + lf.A_SUFFIX]) for c in replies], axis=0)
    assert np.linalg.norm(mean_b @ mean_a - true) > 0.5 * np.linalg.norm(true)
    strategy = SVDLoRA()
    strategy.current = _global()
    out = strategy.combine(replies, [1.0] * 4, [R] * 4, [LAYER])
    singular = np.linalg.svd(true, compute_uv=False)
    err = np.linalg.norm(lf.product(out[LAYER + lf.B_SUFFIX], out[LAYER + lf.A_SUFFIX]) - true)
    assert err <= np.sqrt((singular[R:] ** 2).sum()) + 1e-9 < np.linalg.norm(mean_b @ mean_a - true)


def test_load_global_fits_the_rank_and_applies_the_frozen_update(base_model, tokenizer):
    net = lora.attach_lora(base_model, 2, 4.0, ["q_proj"])
    arrays = lora.get_adapter_arrays(net)
    layer = next(k for k in arrays if k.endswith(lf.A_SUFFIX))[: -len(lf.A_SUFFIX)]
    module = net.get_submodule(layer)
    w0 = module.get_base_layer().weight.detach().clone()
    wide = lora.pad_rank(arrays, 6)  # a rank-6 global: fitted down to this client's 2
    b_f, a_f = RNG.normal(size=(w0.shape[0], 3)), RNG.normal(size=(3, w0.shape[1]))
    lora.load_global(net, {**wide, layer + lf.FROZEN_B: b_f, layer + lf.FROZEN_A: a_f})
    expected = w0 + module.scaling["default"] * torch.as_tensor(b_f @ a_f, dtype=torch.float32)
    torch.testing.assert_close(module.get_base_layer().weight.detach(), expected)
    lora.load_global(net, wide)  # the next global has no frozen update: the base is restored, not accumulated
    torch.testing.assert_close(module.get_base_layer().weight.detach(), w0)


def test_lora_ranks_config():
    s = Settings.from_run_config({"lora-ranks": "2, 4,8", "lora-rank": 4, "lora-alpha": 8.0})
    assert [s.rank_of(p) for p in range(5)] == [2, 4, 8, 2, 4]
    assert s.global_rank == 8 and s.lora_alpha_for(8) / 8 == s.lora_alpha_for(2) / 2 == 2.0
    assert Settings.from_run_config({}).client_ranks == [8]
    with pytest.raises(ConfigError, match="'lora-ranks'.*positive integers"):
        Settings.from_run_config({"lora-ranks": "4,0"})


def test_codec_noise_in_a_clients_padding_is_ignored():
    """A lossy codec can leave non-zeros where a low-rank client's padding was; the product must not see them."""
    reply = _client(3)
    noisy = OrderedDict(reply)
    noisy[LAYER + lf.A_SUFFIX] = reply[LAYER + lf.A_SUFFIX] + np.pad(RNG.normal(size=(R - 3, IN)), ((3, 0), (0, 0)))
    noisy[LAYER + lf.B_SUFFIX] = reply[LAYER + lf.B_SUFFIX] + np.pad(RNG.normal(size=(OUT, R - 3)), ((0, 0), (3, 0)))
    cleaned = lf.zero_beyond_rank(noisy, 3)
    for key in reply:
        np.testing.assert_array_equal(cleaned[key], reply[key])


def test_hetlora_with_equal_product_norms_is_fedavg_of_the_factors():
    """Equal ||B_i A_i||: sparsity weights are uniform, so HetLoRA is the naive (padded) factor mean."""
    strategy = HetLoRA()
    strategy.current = _global()
    one = _client(R)
    replies = [one, OrderedDict((k, -v if k.endswith(lf.B_SUFFIX) else v) for k, v in one.items()), _client(R)]
    scale = np.linalg.norm(lf.product(one[LAYER + lf.B_SUFFIX], one[LAYER + lf.A_SUFFIX]))
    third = replies[2]
    third[LAYER + lf.B_SUFFIX] *= scale / np.linalg.norm(lf.product(third[LAYER + lf.B_SUFFIX], third[LAYER + lf.A_SUFFIX]))
    out = strategy.combine(replies, [1.0, 2.0, 5.0], [R] * 3, [LAYER])
    for key in (LAYER + lf.A_SUFFIX, LAYER + lf.B_SUFFIX):
        np.testing.assert_allclose(out[key], lf.weighted_mean(replies, [1.0, 1.0, 1.0], key))
