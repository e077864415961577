"""``privacy_mod`` (pairs with strategies/privacy.py): client-level DP on the
train reply. With Flower's clipping-norm key in the config (central DP with
client-side clipping) it runs Flower's ``fixedclipping_mod``; with fedmm's
``dp-mode`` (local or distributed DP, keys in ``fedmm.protocol``) it clips the
update to C and, for local DP, adds N(0, sigma^2 C^2) it computes itself from the multiplier sigma
(distributed DP's share is integer noise, added under secure aggregation by ``secagg_mod``). Local DP is the
client's: its ledger follows from the noise it adds (multiplier sigma / 2,
sensitivity 2C), it is kept in ``context.state``, and the client declines a
round, with the reason, once the next release would exceed its budget (the
smaller of the server's and its node config's ``dp-max-epsilon``), when the
server asks for less noise than its floor (node config
``dp-min-noise-multiplier``; the run config's multiplier when the run is
``dp = local``), or when the server asks for no noise at all although the
floor requires it. A no-op for other messages of a client without a floor.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients.messages import decline, number_problem
from clients.settings import run_settings
from fedmm import protocol
from fedmm.privacy import privatize_update, sample_epsilon
from fedmm.protocol import to_numpy, to_record

LEDGER_KEY = "dp-ledger"  # context.state: this client's (sigma, q, steps) releases, across rounds


def load_ledger(context: Context) -> list[tuple[float, float, int]]:
    """This client's privacy ledger (empty on its first round)."""
    if LEDGER_KEY not in context.state:
        return []
    rec = protocol.config_in(context.state, LEDGER_KEY)
    sigma, q, steps = (rec.get(key) for key in ("sigma", "q", "steps"))
    if not (isinstance(sigma, list) and isinstance(q, list) and isinstance(steps, list)):
        raise ValueError(f"context state '{LEDGER_KEY}': expected three lists")
    return [(protocol.as_number(a, "sigma"), protocol.as_number(b, "q"), int(protocol.as_number(c, "steps")))
            for a, b, c in zip(sigma, q, steps)]


def store_ledger(context: Context, ledger: list[tuple[float, float, int]]) -> None:
    context.state[LEDGER_KEY] = ConfigRecord(
        {"sigma": [float(h[0]) for h in ledger], "q": [float(h[1]) for h in ledger], "steps": [int(h[2]) for h in ledger]}
    )


def budget_refusal(
    ledger: list[tuple[float, float, int]], release: tuple[float, float, int], delta: float, max_epsilon: float
) -> str | None:
    """Why the next ``release`` must not happen (it would exceed ``max_epsilon``), or None (0 = no budget)."""
    planned = sample_epsilon(ledger + [release], delta)
    if max_epsilon <= 0 or planned <= max_epsilon:
        return None
    return (f"privacy budget spent: epsilon {sample_epsilon(ledger, delta):.3f}, one more release would reach "
            f"{planned:.3f} > max-epsilon {max_epsilon:g}")


def _positive_number(config, key: str, where: str, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``) under ``key``; ValueError naming the key otherwise."""
    value = config[key]
    problem = number_problem(value, 0.0, math.inf, above_lo=not allow_zero)
    if problem:
        raise ValueError(f"{where} '{key}' = {value!r} {problem}")
    return float(value)


def privacy_floor(context: Context) -> tuple[float, float, float | None, str]:
    """What this client requires of the noise on its own update: (min multiplier, max epsilon, delta, why).

    From its node config (``dp-min-noise-multiplier``, ``dp-max-epsilon``,
    ``dp-delta``: the site's own, never the server's), and from the run config's
    ``dp = local`` (the run the site joined promised local DP at that
    multiplier). ValueError names a bad node-config key.
    """
    node = context.node_config
    floor, budget, delta, why = 0.0, 0.0, None, ""
    if protocol.NODE_MIN_NOISE_MULTIPLIER in node:
        floor = _positive_number(node, protocol.NODE_MIN_NOISE_MULTIPLIER, "node config")
        why = f"node config '{protocol.NODE_MIN_NOISE_MULTIPLIER}' = {floor:g}"
    if protocol.NODE_MAX_EPSILON in node:
        budget = _positive_number(node, protocol.NODE_MAX_EPSILON, "node config")
    if protocol.NODE_DELTA in node:
        delta = _positive_number(node, protocol.NODE_DELTA, "node config")
    if context.run_config.get("dp") == "local":
        promised = run_settings(context).dp_noise_multiplier
        if promised > floor:
            floor, why = promised, f"run config 'dp' = 'local' at 'dp-noise-multiplier' = {promised:g}"
    return floor, budget, delta, why


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error() or protocol.CONFIG not in msg.content:
        return call_next(msg, context)
    config = protocol.config_in(msg.content)
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    who = f"node {context.node_id}"
    try:
        floor, own_budget, own_delta, why = privacy_floor(context)
    except ValueError as exc:
        return decline(msg, f"{who}: {exc}")
    mode = config.get(protocol.DP_MODE)
    if mode is None:
        if floor > 0:  # this client sends nothing without its noise
            return decline(msg, f"{who}: {why} requires local DP, and the server's train instruction asks for "
                                f"no client-side noise ('{protocol.DP_MODE}' missing)")
        return call_next(msg, context)
    try:
        if mode not in protocol.CLIENT_DP_MODES:
            raise ValueError(f"train config '{protocol.DP_MODE}' = {mode!r} must be one of "
                             f"{', '.join(protocol.CLIENT_DP_MODES)}")
        clip = _positive_number(config, protocol.DP_CLIP_NORM, "train config")
        sigma = _positive_number(config, protocol.DP_NOISE_MULTIPLIER, "train config")
        shares = 1.0
        if mode == "distributed":
            shares = _positive_number(config, protocol.DP_NOISE_SHARES, "train config")
        delta = min(protocol.number(config, protocol.DP_DELTA, 1e-5), own_delta or 1.0)
        if not 0 < delta < 1:
            raise ValueError(f"train config '{protocol.DP_DELTA}' = {delta!r} must be in (0, 1)")
        budgets = [b for b in (_positive_number(config, protocol.DP_MAX_EPSILON, "train config", allow_zero=True)
                               if protocol.DP_MAX_EPSILON in config else 0.0, own_budget) if b > 0]
    except KeyError as exc:
        return decline(msg, f"{who}: train config {exc} is missing for '{protocol.DP_MODE}' = {mode!r}")
    except ValueError as exc:
        return decline(msg, f"{who}: {exc}")
    # what leaves this client carries noise of multiplier sigma / sqrt(shares) on its own
    effective = sigma / shares**0.5
    if effective < floor:
        return decline(msg, f"{who}: the server asks for noise multiplier {effective:g} on this client's update "
                            f"('{mode}'), below its floor {floor:g} ({why})")
    # local DP: changing this client's data moves its clipped update by up to 2C, so each release is a
    # Gaussian mechanism of multiplier sigma / 2 — derived from the noise actually added, never sent
    ledger_sigma = sigma / 2 if mode == "local" else 0.0
    ledger = load_ledger(context)
    max_epsilon = min(budgets) if budgets else 0.0
    if ledger_sigma > 0:  # this client's own guarantee, checked before any work
        refusal = budget_refusal(ledger, (ledger_sigma, 1.0, 1), delta, max_epsilon)
        if refusal:
            return decline(msg, f"{who}: {refusal}")
    global_arrays = to_numpy(protocol.arrays_in(msg.content))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local = to_numpy(protocol.arrays_in(reply.content))
    delta_arrays = OrderedDict((k, local[k] - global_arrays[k]) for k in local)
    # fresh OS entropy, never the run seed: noise the server could regenerate would protect nothing
    # distributed: the noise share is integer (Skellam), added inside the masked sum by secagg_mod
    std = 0.0 if mode == "distributed" else sigma * clip
    private = privatize_update(delta_arrays, clip, std, np.random.default_rng())
    reply.content[protocol.ARRAYS] = to_record(OrderedDict((k, global_arrays[k] + private[k]) for k in local))
    # the update's norm before clipping, and whether clipping bound, are the private examples' function with
    # no noise: withheld (fedmm/privacy/release.py)
    metrics = protocol.metrics_in(reply.content)
    if ledger_sigma > 0:
        ledger = ledger + [(ledger_sigma, 1.0, 1)]
        store_ledger(context, ledger)
        metrics[protocol.DP_EPSILON] = sample_epsilon(ledger, delta)
    return reply
