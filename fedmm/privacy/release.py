"""What a client's replies carry under DP: what the guarantee covers, and what it explicitly does not.

The guarantees (fedmm/privacy/plan.py: ``PRIVACY_LEVELS``) cover the adapter
update a client sends, computed from its training split. Every metric a reply
carries under DP is one of three kinds, and ``release_rule`` says which:

- withheld (``WITHHELD_UNDER_DP``): a function of the private examples with no
  noise at all — the raw training losses, DP-SGD's sampling rate, and the
  update's norm before clipping and whether clipping bound (the update is
  covered only after clipping and noise); a client never sends these under DP;
- data-independent (``DATA_INDEPENDENT``): fixed by the run or the site's
  configuration, whatever its examples hold;
- outside the guarantee (``OUTSIDE``): data-dependent, sent for a stated
  reason, and listed as such beside the guarantee in the report.

A metric of none of the three kinds must not leave a client under DP
(tests/test_client_app.py enumerates every metric of every reply under each
mode against this rule, so a new metric is caught).
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import protocol

# train-reply metrics a client does not send under any DP mode
WITHHELD_UNDER_DP = (protocol.TRAIN_LOSS, protocol.CONTRASTIVE_LOSS, protocol.GLOBAL_TRAIN_LOSS,
                     protocol.DP_SAMPLE_RATE, protocol.UPDATE_NORM, protocol.CLIPPED)

# metrics that do not depend on a client's examples, and why
DATA_INDEPENDENT = {
    protocol.UNIT_WEIGHT: "always 1 (the weight of a uniform mean)",
    protocol.PARTITION_ID: "the site's index in the run (or its node id): its identity, not its data",
    protocol.LORA_RANK: "the LoRA rank the site's tier trains",
}

# data-dependent metrics sent under DP, by the keys (or key prefixes) they cover, and why they are sent
OUTSIDE: tuple[tuple[tuple[str, ...], str], ...] = (
    ((protocol.NUM_EXAMPLES, protocol.DP_EPSILON),
     "num-examples (train and evaluate): how many examples a client holds, and under dp-sgd the epsilon it reports, "
     "which follows from that count; sent because aggregation weights and per-client metrics need it. The "
     "guarantee protects what the examples contain, not how many there are"),
    ((protocol.TRAIN_SECONDS, protocol.STEP_SECONDS, protocol.STEPS_DONE, protocol.WORK_FRACTION,
      protocol.ENCODE_SECONDS, protocol.BYTES_UPLINK),
     "timing and effort (train-seconds, step-seconds, steps-done, work-fraction, encode-seconds, bytes-uplink): "
     "sent for the report's cost figures; they depend on the client's hardware and data size, not on content"),
    ((*protocol.EVALUATE_SCALARS, *protocol.EVALUATE_COUNTS),
     "evaluate replies (zero-shot accuracy, retrieval, grounding, the audit's robust accuracy and consistency, "
     "per-group and toxic-retrieval counts): computed "
     "on the client's held-out split, which never trains and which the guarantee does not cover; they are "
     "aggregated, and also shown per client in the report's clients.csv"),
    ((protocol.PERSONAL,),
     "personal evaluation (personal-*, methods that keep a personal model or heads): the same metrics of the "
     "client's own model on its held-out split; the personal model itself never leaves the client"),
    ((protocol.CONSTRAINT_STAT,),
     "constraint statistics (cstat-*, with constraints on): per-group counts of the training batches, which the "
     "server needs for its dual step"),
)

# the report's list, beside the guarantee
OUTSIDE_GUARANTEE = tuple(why for _, why in OUTSIDE)


def release_rule(key: str) -> str | None:
    """Why metric ``key`` may leave a client under DP (data-independent, or listed outside the guarantee), or
    None: then it must not."""
    if key in WITHHELD_UNDER_DP:
        return None
    if key in DATA_INDEPENDENT:
        return f"data-independent: {DATA_INDEPENDENT[key]}"
    for keys, why in OUTSIDE:
        if any(key == k or (k.endswith("-") and key.startswith(k)) for k in keys):
            return f"outside the guarantee: {why}"
    return None


# what every train reply of fedmm's ClientApp carries, whatever the run (clients/app.py, compression_mod)
TRAIN_ALWAYS = (protocol.NUM_EXAMPLES, protocol.UNIT_WEIGHT, protocol.PARTITION_ID, protocol.LORA_RANK,
                protocol.TRAIN_SECONDS, protocol.STEP_SECONDS, protocol.STEPS_DONE, protocol.WORK_FRACTION,
                protocol.BYTES_UPLINK, protocol.ENCODE_SECONDS)
EVALUATE_ALWAYS = (protocol.NUM_EXAMPLES, protocol.UNIT_WEIGHT, protocol.PARTITION_ID, *protocol.EVALUATE_SCALARS)
# key families whose names depend on the run's groups and classes: their keys are settled per round
TRAIN_FAMILIES = (protocol.CONSTRAINT_STAT,)
EVALUATE_FAMILIES = (*protocol.EVALUATE_COUNTS, protocol.PERSONAL)


def train_metric_keys(dp: str, secure_aggregation: bool, report_train_loss: bool) -> frozenset[str]:
    """The metric keys (outside the families) every honest train reply carries in a run: what the server
    expects, so that the round's key set is the protocol's and never a vote among replies."""
    keys = set(TRAIN_ALWAYS)
    if dp == "none":
        keys |= {protocol.TRAIN_LOSS, protocol.CONTRASTIVE_LOSS}
        if report_train_loss:
            keys.add(protocol.GLOBAL_TRAIN_LOSS)
        if secure_aggregation:
            keys.add(protocol.CLIPPED)
    if dp in ("dp-sgd", "local"):
        keys.add(protocol.DP_EPSILON)  # the client's own ledger
    return frozenset(keys)


def released_train_metrics(metrics: Mapping[str, float], dp: str) -> dict[str, protocol.MetricValue]:
    """The train-reply metrics a client sends under ``dp`` (everything, without DP)."""
    if dp == "none":
        return dict(metrics)
    return {k: v for k, v in metrics.items() if k not in WITHHELD_UNDER_DP}
