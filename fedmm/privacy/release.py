"""What a client's replies carry under DP: what the guarantee covers, and what it explicitly does not.

The guarantees (fedmm/privacy/plan.py: ``PRIVACY_LEVELS``) cover the adapter
update a client sends, computed from its training split. Everything else a
reply carries is either withheld under DP (``WITHHELD_UNDER_DP``: the raw
training losses, which are a function of the private examples with no noise
at all, and DP-SGD's sampling rate) or listed in ``OUTSIDE_GUARANTEE`` with
the reason it is sent; the report prints that list beside the guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import protocol

# train-reply metrics a client does not send under any DP mode
WITHHELD_UNDER_DP = (protocol.TRAIN_LOSS, protocol.CONTRASTIVE_LOSS, protocol.GLOBAL_TRAIN_LOSS, protocol.DP_SAMPLE_RATE)

# what still leaves a client under DP, not covered by the guarantee, and why it is sent
OUTSIDE_GUARANTEE = (
    "num-examples (train and evaluate): how many examples a client holds, and under dp-sgd the epsilon it reports, "
    "which follows from that count; sent because aggregation weights and per-client metrics need it. The "
    "guarantee protects what the examples contain, not how many there are",
    "timing and effort (train-seconds, step-seconds, steps-done, work-fraction, encode-seconds, bytes-uplink): "
    "sent for the report's cost figures; they depend on the client's hardware and data size, not on content",
    "evaluate replies (zero-shot accuracy, retrieval, grounding, per-group and toxic-retrieval counts): computed "
    "on the client's held-out split, which never trains and which the guarantee does not cover; they are "
    "aggregated, and also shown per client in the report's clients.csv",
    "constraint statistics (cstat-*, with constraints on): per-group counts of the training batches, which the "
    "server needs for its dual step",
)


def released_train_metrics(metrics: Mapping[str, float], dp: str) -> dict[str, float]:
    """The train-reply metrics a client sends under ``dp`` (everything, without DP)."""
    if dp == "none":
        return dict(metrics)
    return {k: v for k, v in metrics.items() if k not in WITHHELD_UNDER_DP}
