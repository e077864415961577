"""The run's privacy plan, checked before round 1, and the guarantee texts the report states.

``privacy_plan`` turns the run's privacy settings into the number of rounds
the budget allows (central and distributed DP: every round costs the same,
so it is known up front) and warnings (delta too large for the population),
and raises ``ConfigError`` when nothing is possible, all before any client
is contacted. ``PRIVACY_LEVELS`` says, per ``dp`` mode, what the guarantee
covers, against whom, and under which assumptions; ``privacy_summary`` puts
it in the report.
"""

from __future__ import annotations

import logging

from ..config import ConfigError, Settings
from ..data import client_rows, train_sizes
from .accounting import gaussian_epsilon, rounds_allowed
from .release import OUTSIDE_GUARANTEE
from ..secagg.plan import SecAggPlan

log = logging.getLogger("fedmm.privacy")

# client-level modes whose noise is calibrated to a uniform mean of clipped updates, accounted by the server
CENTRAL_MODES = ("central-server", "central-client", "distributed")


def needs_uniform_mean(dp: str) -> bool:
    return dp in CENTRAL_MODES


def release_independent_of_one_client(dp: str) -> bool:
    """Whether the server's checks beneath the DP wrapper must not decide a release on one client's update.

    Under central DP (central-server, central-client) Flower's accounted wrapper releases a round only when
    every sampled client's update reaches it (its event was planned for that cohort). A check above it that
    drops an update (``max-update-norm-ratio``: more than r x the round's median norm) therefore lets one
    client's data switch a round between released and not released, visibly to anyone who sees the global
    models and never charged by the accountant. Such a check is not needed there: the wrapper bounds each
    client's influence itself by clipping to C. So under central DP the ratio drop is off, and an update
    that cannot be used (non-finite) enters as a zero update: a contribution inside the clipping ball, which
    the mechanism's sensitivity already covers, so the release and its accounting stand whatever one client
    sent. Distributed DP is released by the secure sum, which no per-client check sees; local and dp-sgd
    updates are private before they leave the client, and every check on them is post-processing.
    """
    return dp in ("central-server", "central-client")


# What each dp mode guarantees, to whom, and under which assumptions (written into the report).
PRIVACY_LEVELS = {
    "none": "no differential privacy",
    "dp-sgd": "sample level, per client: (epsilon, delta)-DP for any one training example of a client, "
              "against anyone who sees that client's updates (the server included). DP-SGD (Opacus) with "
              "Poisson sampling at rate q = 1/ceil(n/batch-size) per step; RDP accounting (Opacus) over every "
              "step of every round the client trained; per-sample loss against public negatives embedded each step "
              "(fedmm/losses.py), so per-sample gradients are independent",
    "central-server": "client level: (epsilon, delta)-DP for any one client's whole data, against anyone who "
                      "sees the global models (not against the server, which sees raw updates). Server clips "
                      "each update to C and adds N(0, (sigma C / n)^2) to the uniform mean; Flower's RDP "
                      "accountant, add/remove one client, no amplification from client sampling claimed. No "
                      "per-client check decides whether a round is released (an update that does not decode "
                      "enters as a zero update; the norm-ratio drop is off)",
    "central-client": "client level, as central-server, but clients clip their own updates "
                      "(Flower's fixedclipping_mod); the server adds the noise; Flower's RDP accountant. Only with "
                      "codec fp32: a lossy codec's output is not bounded by C, so it is refused",
    "local": "client level, per client: (epsilon, delta)-DP for the client's training data, against anyone, "
             "the server included. Each client clips its update to C and adds N(0, sigma^2 C^2) before encoding "
             "(any codec and error feedback are post-processing); sensitivity 2C (any change of its data), so "
             "each release is a Gaussian mechanism of multiplier sigma/2; the client derives its ledger from the "
             "noise it adds and keeps it itself, and declines requests below its own floor (node config "
             "dp-min-noise-multiplier, dp-max-epsilon, dp-delta)",
    "distributed": "client level, central-equivalent, against everyone the server included: each client clips "
                   "its update to C, rounds it to integers and adds a Skellam share of the noise inside the "
                   "secure-aggregation sum (SecAgg+), so the server only ever sees the sum, which carries noise "
                   "of multiplier sigma whenever at least t (secagg-threshold) of the round's contributors are "
                   "honest. The mechanism is Skellam (not the distributed discrete Gaussian; only its "
                   "conditional rounding is used): Skellam RDP bound (Agarwal, Kairouz & Liu 2021), add/remove "
                   "one client, no "
                   "amplification claimed. Assumes a semi-honest server (it follows the protocol; SecAgg+'s "
                   "consistency check against a server that lies about dropouts is not run) and fewer than t "
                   "colluding clients in any neighbourhood",
}


SECURE_AGGREGATION = (
    "SecAgg+ (Bell et al. 2020) in Z_2^{b}, threshold t = {t}: the server, and anyone who reads the wire, learns "
    "only the sum of a round's contributors' clipped, integer-rounded updates, never one of them, provided it "
    "follows the protocol (semi-honest) and fewer than t clients of a neighbourhood collude with it; a round with "
    "fewer than t contributors releases nothing, a round sums at most the contributors its ring was sized for, and "
    "a round whose contributors fall apart into groups that share no neighbours aborts before anything is "
    "unmasked. Not covered: each reply's metrics (losses, example counts, evaluation counts) travel in the clear; "
    "a hostile client can spoil the sum within what an update clipped to C allows (the server clips a decoded "
    "mean beyond that bound; no one can check a masked vector), and can make a round abort (shares are not "
    "verifiable: an owner whose secret does not rebuild is named and excluded from later rounds)"
)


# How central DP's accounting reads in an asynchronous run (server/asynchronous.py, strategies/staleness.py).
ASYNCHRONOUS_RELEASES = (
    "asynchronous: each aggregation is one release, the clipped mean of {k} updates from {k} distinct clients (a "
    "fast client's next update waits for the next aggregation), with noise sigma C / {k}; the staleness weight "
    "scales an update (s <= 1) rather than reweighting the mean, so no client's share exceeds C / {k}. Which "
    "clients fill a buffer depends on their speed, not on a random draw, so no amplification by sampling is "
    "claimed: the releases compose as they are, one per aggregation"
)


def privacy_summary(settings: Settings, num_nodes: int, notes: list[str]) -> dict[str, object]:
    summary: dict[str, object] = {
        "dp": settings.dp,
        "guarantee": PRIVACY_LEVELS[settings.dp],
        "outside-guarantee": list(OUTSIDE_GUARANTEE) if settings.dp != "none" else [],
        "noise-multiplier": settings.dp_noise_multiplier,
        "clip-norm": settings.dp_clip_norm,
        "delta": settings.dp_delta,
        "max-epsilon": settings.max_epsilon or None,
        "clients": num_nodes,
        "notes": notes,
    }
    if settings.asynchronous and settings.dp in CENTRAL_MODES:
        summary["asynchronous"] = ASYNCHRONOUS_RELEASES.format(k=settings.buffer_size)
    if settings.secure_aggregation:
        summary["secure-aggregation"] = SECURE_AGGREGATION.format(
            t=settings.secagg_threshold or "a majority of a neighbourhood", b=settings.secagg_bits)
    return summary


def skellam_rounds_allowed(secagg: SecAggPlan, adapter_dim: int, settings: Settings) -> int:
    """Rounds (at most the run's) whose summed Skellam releases stay within ``max-epsilon``."""
    rounds = 0
    while (rounds < settings.num_server_rounds
           and secagg.epsilon(adapter_dim, rounds + 1, settings.dp_delta) <= settings.max_epsilon):
        rounds += 1
    return rounds


def privacy_plan(settings: Settings, num_nodes: int, secagg: SecAggPlan | None = None,
                 adapter_dim: int = 0) -> tuple[int, list[str]]:
    """Rounds the privacy budget allows, and warnings; raises before round 1 when nothing is possible.
    ``secagg`` and ``adapter_dim`` (the values one update holds) size distributed DP's integer mechanism."""
    notes: list[str] = []
    rounds = settings.num_server_rounds
    if settings.dp in CENTRAL_MODES:
        if settings.dp_delta >= 1 / num_nodes:
            notes.append(f"dp-delta {settings.dp_delta:g} >= 1/{num_nodes} clients: a guarantee that may "
                         "fail for one client in the federation is weak; lower dp-delta")
        if settings.max_epsilon > 0:
            if settings.dp == "distributed":
                if secagg is None:
                    raise ValueError("privacy_plan: dp = 'distributed' needs the secure-aggregation plan")
                rounds = skellam_rounds_allowed(secagg, adapter_dim, settings)
                first = secagg.epsilon(adapter_dim, 1, settings.dp_delta)
            else:
                rounds = rounds_allowed(settings.dp_noise_multiplier, settings.dp_delta, num_nodes,
                                        settings.max_epsilon, settings.num_server_rounds)
                first = gaussian_epsilon(settings.dp_noise_multiplier, 1, settings.dp_delta)
            if rounds == 0:
                raise ConfigError(
                    f"run-config 'max-epsilon' = {settings.max_epsilon:g}: one round at noise multiplier "
                    f"{settings.dp_noise_multiplier:g} already costs epsilon {first:.3f}"
                )
            if rounds < settings.num_server_rounds:
                notes.append(f"max-epsilon {settings.max_epsilon:g} allows {rounds} of "
                             f"{settings.num_server_rounds} rounds: the run stops after round {rounds}")
    if settings.dp == "dp-sgd":
        # the run dataset's partitions: sites that bring their own data are not seen from here
        small = min(train_sizes(settings, client_rows(settings), num_nodes))
        if small and settings.dp_delta >= 1 / small:
            notes.append(f"dp-delta {settings.dp_delta:g} >= 1/{small} (the smallest client's examples): "
                         "a guarantee that may fail for one example is weak; lower dp-delta")
    if settings.dp != "none" and settings.constraint_list:
        notes.append("the constraint statistics (per-group and toxic-retrieval counts) travel unprotected, like "
                     "every reply's metrics: the guarantee covers the adapter updates, not the multipliers")
    for note in notes:
        log.warning("fedmm privacy: %s", note)
    return rounds, notes
