"""Secure aggregation's core, without a federation: SecAgg+'s stages, the integer encoding, the Skellam ledger."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy import special, stats

from fedmm.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    decode_sum,
    derive_code,
    encode_integer,
    prg_mask,
    ring_sum,
    skellam_epsilon,
    skellam_rdp,
)
from fedmm.secagg.integer import IntegerCode, bernstein_tail, ring_dtype, round_stochastic, skellam_noise
from fedmm.secagg.graph import default_threshold, neighbourhood_size, neighbourhoods, round_failure_bound
from fedmm.secagg.keys import combine_secret, split_secret

STAGES = ("keys", "share", "mask", "unmask")


def _round(vectors: dict[int, np.ndarray], bits: int, threshold: int, size: int | None = None,
           drop: dict[str, set[int]] | None = None, tamper=None, seed: int = 0):
    """One SecAgg+ round in process; ``drop[stage]``: who sends no reply to that stage; ``tamper(stage, replies)``
    may rewrite the replies before the server reads them."""
    drop = drop or {}
    ids = sorted(vectors)
    length = len(next(iter(vectors.values())))
    server = SecAggServer(ids, threshold, bits, length, size or len(ids), rng=random.Random(seed))
    clients = {i: SecAggClient(i) for i in ids}
    received: dict[str, dict] = {}

    def gather(stage: str, ask: dict[int, object], answer) -> dict[int, object]:
        replies = {i: answer(i, req) for i, req in ask.items() if i not in drop.get(stage, set())}
        if tamper:
            replies = tamper(stage, replies)
        received[stage] = replies
        return replies

    requests = server.collect_keys(gather("keys", {i: None for i in ids}, lambda i, _: clients[i].public_keys()))
    inbox = server.collect_shares(gather("share", requests,
                                         lambda i, keys: clients[i].share(keys, server.threshold, bits, length)))
    asks = server.collect_masked(gather("mask", inbox, lambda i, c: clients[i].mask(c, vectors[i])))
    total = server.collect_unmask(gather("unmask", asks, lambda i, a: clients[i].unmask(*a)))
    return total, server, clients, received


def _vectors(n: int, length: int, bits: int, seed: int = 1) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = ring_dtype(bits)
    # node ids as Flower gives them: large, unordered
    return {int(i): rng.integers(0, 1 << bits, length).astype(dtype) for i in rng.choice(10**12, n, replace=False)}


def test_the_unmasked_sum_is_the_plaintext_sum_bit_for_bit():
    vectors = _vectors(7, 1000, 16)
    total, server, _, _ = _round(vectors, 16, threshold=4)
    assert server.dropped == {}
    assert np.array_equal(total, ring_sum(list(vectors.values()), 16))


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_any_stage_leave_the_exact_sum_of_the_contributors(stage):
    vectors = _vectors(10, 500, 16, seed=2)
    ids = sorted(vectors)
    gone = set(ids[:3])  # 30% of the clients vanish at this stage
    total, server, _, _ = _round(vectors, 16, threshold=5, drop={stage: gone})
    assert set(server.dropped) == gone and all(r.startswith(stage) for r in server.dropped.values())
    # a client that vanished after sending its masked vector still counts; before it, it does not
    contributors = ids if stage == "unmask" else [i for i in ids if i not in gone]
    assert server.contributors == contributors
    assert np.array_equal(total, ring_sum([vectors[i] for i in contributors], 16))


def test_a_sparse_graph_with_dropouts_still_sums_exactly():
    vectors = _vectors(15, 200, 12, seed=3)
    ids = sorted(vectors)
    total, server, clients, _ = _round(vectors, 12, threshold=4, size=7, drop={"mask": {ids[0]}, "unmask": {ids[5]}})
    assert all(len(c.neighbourhood) == 7 for c in clients.values())  # each client shares with 6 others only
    assert np.array_equal(total, ring_sum([vectors[i] for i in ids[1:]], 12))


def test_too_few_clients_end_the_round_cleanly_with_the_reason():
    vectors = _vectors(6, 100, 16, seed=4)
    ids = sorted(vectors)
    with pytest.raises(SecAggAbort, match=r"mask: 3 clients left, threshold 4"):
        _round(vectors, 16, threshold=4, drop={"mask": set(ids[:3])})
    # enough sent their vectors, but too few answer the unmask stage: the masks cannot be removed
    with pytest.raises(SecAggAbort, match=r"unmask: 3 shares of node \d+'s secret, threshold 4"):
        _round(vectors, 16, threshold=4, drop={"unmask": set(ids[:3])})


def _chi2_uniform(values: np.ndarray, bits: int) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=1 << bits)
    return float(stats.chisquare(counts).pvalue)


def test_the_server_sees_one_clients_masked_vector_as_uniform_over_the_ring():
    bits, length = 8, 200_000
    # the worst case for a mask: a client whose vector is constant
    vectors = {i: np.full(length, 7, dtype=np.uint8) for i in (11, 22, 33, 44)}
    _, server, _, received = _round(vectors, bits, threshold=3)
    y = received["mask"][11]
    assert _chi2_uniform(y, bits) > 1e-4
    assert _chi2_uniform(vectors[11], bits) < 1e-12  # the test does see a vector that is not masked
    # one mask of ours is uniform; Flower's pseudo_rand_gen never draws 2^b - 1, and the test sees it
    seed = hashlib.sha256(b"x").digest()
    assert _chi2_uniform(prg_mask(seed, length, bits), bits) > 1e-4
    (flower,) = pseudo_rand_gen(seed, 1 << bits, [(length,)])
    assert _chi2_uniform(flower, bits) < 1e-12


def test_fewer_than_t_shares_do_not_rebuild_a_secret():
    secret = bytes(range(16))
    shares = split_secret(secret, 4, 7)
    assert combine_secret(shares[:4]) == combine_secret(shares[3:]) == secret
    for subset in (shares[:3], shares[2:5]):
        assert combine_secret(subset) != secret
    with pytest.raises(ValueError, match="4 \\+ 16 bytes"):
        combine_secret([shares[0][:10], *shares[1:4]])


def test_the_server_never_holds_both_secrets_of_one_client():
    vectors = _vectors(8, 50, 16, seed=5)
    ids = sorted(vectors)
    _, server, clients, received = _round(vectors, 16, threshold=4, drop={"mask": {ids[1], ids[2]}})
    kinds: dict[int, set[str]] = {}
    for holder, reply in received["unmask"].items():
        for owner, share in reply.items():
            kind = "self-mask" if share == clients[holder]._b_shares.get(owner) else "mask-key"
            assert share in (clients[holder]._b_shares.get(owner), clients[holder]._s_shares.get(owner))
            kinds.setdefault(owner, set()).add(kind)
    assert kinds[ids[1]] == kinds[ids[2]] == {"mask-key"}
    assert all(kinds[i] == {"self-mask"} for i in ids if i not in (ids[1], ids[2]))
    # a server that asks for both is refused, and so is a second request
    _, _, clients, _ = _round(vectors, 16, threshold=4, drop={"unmask": {ids[0]}})
    with pytest.raises(ValueError, match="both shares"):
        clients[ids[0]].unmask([ids[0], ids[3], ids[4], ids[5]], [ids[3]])
    clients[ids[0]].unmask([ids[0], ids[3], ids[4], ids[5]], [])
    with pytest.raises(ValueError, match="second unmask"):
        clients[ids[0]].unmask([ids[0], ids[3], ids[4], ids[5]], [])


def test_hostile_replies_drop_their_sender_and_the_round_goes_on():
    vectors = _vectors(8, 64, 16, seed=6)
    ids = sorted(vectors)
    bad = {"keys": ids[0], "share": ids[1], "mask": ids[2], "unmask": ids[3]}
    junk = {"keys": (b"a", b"a"), "share": ({1: "x"}, b"short"), "mask": np.zeros(3, np.uint16), "unmask": ["no"]}

    def tamper(stage, replies):
        return {**replies, bad[stage]: junk[stage]} if bad[stage] in replies else replies

    total, server, _, _ = _round(vectors, 16, threshold=4, tamper=tamper)
    assert sorted(server.dropped) == sorted(bad.values())
    assert "malformed" in server.dropped[ids[0]] and "vector" in server.dropped[ids[2]]
    # ids[3]'s vector was in before its unmask reply went wrong: it counts, its own mask removed by the others
    assert np.array_equal(total, ring_sum([vectors[i] for i in ids if i not in ids[:3]], 16))


def test_a_code_that_could_wrap_is_refused_with_the_numbers():
    code = IntegerCode(dim=1000, clip=1.0, scale=300.0, bits=12, bound=40, noise_variance=0.0, seed=0)
    code.check_ring(50)  # 50 x 40 = 2000 < 2047
    with pytest.raises(ValueError, match=r"sum of 60 clients could wrap around Z_2\^12: signal 60 x 40"):
        code.check_ring(60)
    noisy = IntegerCode(dim=1000, clip=1.0, scale=300.0, bits=12, bound=40, noise_variance=5000.0, seed=0)
    with pytest.raises(ValueError, match="noise tail"):
        noisy.check_ring(10)
    with pytest.raises(ValueError, match="could wrap"):  # no scale is fine enough for this noise in 8 bits
        derive_code(dim=4096, clip=1.0, bits=8, clients=100, noise_multiplier=2.0, threshold=50, seed=0)


def test_a_derived_code_does_not_wrap_even_for_aligned_worst_case_updates():
    n, dim = 20, 3000
    code = derive_code(dim=dim, clip=1.0, bits=16, clients=n, noise_multiplier=1.0, threshold=14, seed=3)
    rng = np.random.default_rng(0)
    worst = np.zeros(dim)
    worst[0] = 5.0  # all the norm in one coordinate, far over the clip: every client the same
    total = ring_sum([encode_integer(worst, code, rng) for _ in range(n)], 16)
    mean = decode_sum(total, code) / n
    sigma = 1.0 * code.l2_sensitivity() / code.scale / n * math.sqrt(n / 14)  # the noise std of the mean
    assert abs(mean[0] - 1.0) < 6 * sigma + 0.01
    assert np.abs(mean[1:]).max() < 6 * sigma + 0.01


def test_the_integer_encoding_is_unbiased():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.3, 64) * np.linspace(0, 1, 64)
    assert abs(round_stochastic(np.full(200_000, 0.3), rng).mean() - 0.3) < 4 * math.sqrt(0.21 / 200_000)
    code = IntegerCode(dim=64, clip=10.0, scale=3.0, bits=16, bound=1000, noise_variance=0.0, seed=9)
    trials = 4000
    decoded = np.stack([decode_sum(ring_sum([encode_integer(x, code, rng)], 16), code) for _ in range(trials)])
    # one coordinate's rounding error is at most 1/scale, its mean's standard error 1/(2 scale sqrt(trials))
    z = (decoded.mean(axis=0) - x) / (0.5 / code.scale / math.sqrt(trials))
    assert np.abs(z).max() < 5
    assert np.abs(decoded.std(axis=0)).max() > 0.01  # it did round at random


def test_a_rounded_update_never_exceeds_the_conditional_norm_bound_the_ledger_charges():
    # every coordinate halfway between two integers: plain stochastic rounding's squared norm is
    # ||x||^2 + D/4 + a term of std ||x||, so a good share of plain draws lands above DDGauss's bound
    dim, scale = 256, 4.0
    x = (np.arange(dim) % 7 + 0.5) / scale * np.where(np.arange(dim) % 2, 1.0, -1.0)
    code = IntegerCode(dim=dim, clip=float(np.linalg.norm(x)) * (1 + 1e-12), scale=scale, bits=20, bound=1000,
                       noise_variance=0.0, seed=0, rotate=False)
    limit = code.rounding_bound()
    assert limit < code.scale * np.linalg.norm(x) + math.sqrt(dim)  # tighter than the plain bound
    rng = np.random.default_rng(4)
    plain = [float(np.linalg.norm(round_stochastic(x * scale, rng))) for _ in range(400)]
    assert sum(p > limit for p in plain) > 20  # the rejection below has something to reject
    signed = [ring_sum([encode_integer(x, code, rng)], 20).astype(np.int64) for _ in range(400)]
    norms = [float(np.linalg.norm(np.where(v >= 1 << 19, v - (1 << 20), v))) for v in signed]
    assert max(norms) <= limit
    assert code.l2_sensitivity() == pytest.approx(limit)


def test_sparse_neighbourhoods_are_sized_for_the_planned_dropout():
    n, dropout = 1000, 0.1
    size = neighbourhood_size(n, dropout)
    t = default_threshold(size)
    assert 2 * math.ceil(math.log2(n)) + 1 < size < n  # bigger than the log-degree graph, still sparse
    assert round_failure_bound(n, size, t, dropout) <= 2.0**-20
    assert round_failure_bound(n, size - 2, default_threshold(size - 2), dropout) > 2.0**-20  # the smallest
    rng = random.Random(5)
    groups = neighbourhoods(list(range(n)), size, rng)
    for _ in range(50):  # independent dropouts at the planned rate: every neighbourhood keeps t
        gone = {i for i in range(n) if rng.random() < dropout}
        assert all(sum(v not in gone for v in g if v != i) >= t for i, g in groups.items())
    # the log-degree graph at 30% dropout: some neighbourhood keeps fewer than t almost surely
    assert neighbourhood_size(100, 0.3) == 100 and round_failure_bound(100, 15, 10, 0.3) > 0.5


def test_noise_shares_sum_to_the_central_skellam():
    rng = np.random.default_rng(2)
    total = sum(skellam_noise(3.0, 100_000, rng) for _ in range(4))
    assert abs(total.var() - 12.0) < 0.3 and abs(total.mean()) < 0.05
    k = np.arange(-12, 13)
    frequency = np.array([(total == v).mean() for v in k])
    assert np.abs(frequency - stats.skellam.pmf(k, 6.0, 6.0)).max() < 0.005


def _renyi(alpha: int, shift: int, variance: float) -> float:
    """D_alpha(Sk + shift || Sk) of one coordinate, summed over the integers (in log space)."""
    k = np.arange(-int(40 * math.sqrt(variance) + 40), int(40 * math.sqrt(variance) + 41))
    log_p = stats.skellam.logpmf(k - shift, variance / 2, variance / 2)
    log_q = stats.skellam.logpmf(k, variance / 2, variance / 2)
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    return float(special.logsumexp(alpha * log_p[keep] + (1 - alpha) * log_q[keep]) / (alpha - 1))


@pytest.mark.parametrize(("shift", "variance"), [((2,), 25.0), ((3,), 100.0), ((5,), 50.0), ((1, 2, 2), 40.0)])
def test_the_skellam_bound_holds_and_is_close_to_the_exact_divergence(shift, variance):
    l1, l2 = float(sum(shift)), math.sqrt(sum(s * s for s in shift))
    for alpha in (2, 4, 8):
        exact = sum(_renyi(alpha, s, variance) for s in shift)  # independent coordinates: divergences add
        bound = skellam_rdp(alpha, l1, l2, variance)
        assert exact <= bound <= 1.15 * exact, (alpha, exact, bound)


def test_the_skellam_epsilon_is_close_to_the_exact_one_over_rounds():
    orders = list(range(2, 65))
    exact = [10 * _renyi(a, 3, 100.0) for a in orders]
    eps_exact, _ = get_privacy_spent(orders=orders, rdp=exact, delta=1e-5)
    eps = skellam_epsilon(3.0, 3.0, 100.0, 10, 1e-5)
    assert eps_exact <= eps <= 1.1 * eps_exact, (eps_exact, eps)


def test_epsilon_composes_over_rounds_and_falls_with_more_noise():
    one = skellam_epsilon(20.0, 20.0, 400.0, 1, 1e-5)
    assert skellam_epsilon(20.0, 20.0, 400.0, 10, 1e-5) > 3 * one > 0
    assert skellam_epsilon(20.0, 20.0, 1600.0, 1, 1e-5) < one
    # with much noise it is the Gaussian mechanism's epsilon (noise multiplier sqrt(variance)/Delta_2)
    from fedmm.privacy import gaussian_epsilon

    sk, gauss = skellam_epsilon(200.0, 200.0, 200.0**2 * 4, 5, 1e-5), gaussian_epsilon(2.0, 5, 1e-5)
    assert gauss <= sk <= 1.02 * gauss


def test_bernstein_tail_bounds_the_noise():
    rng = np.random.default_rng(3)
    t = bernstein_tail(50.0, 1, 1e-3)
    draws = skellam_noise(50.0, 1_000_000, rng)
    assert np.mean(np.abs(draws) > t) < 1e-3
