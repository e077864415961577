from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from clients.compression_mod import RESIDUAL_KEY, compression_mod
from fedmm.compression import (
    CodecError,
    encode_self_describing,
    encode_with_feedback,
    layout_arrays,
    layout_from_arrays,
    layout_of,
    make_codec,
    payload_bytes,
)
from fedmm.compression.codec import index_dtype
from fedmm.compression.quantize import levels, pack_bits, quantize_stochastic, dequantize, unpack_bits
from strategies.compression import CompressedUpdates
from fedmm.protocol import to_numpy, to_record


def _update(seed=0, width=40):
    rng = np.random.default_rng(seed)
    return OrderedDict(
        [("t.lora_A.weight", rng.normal(size=(8, width)).astype(np.float32)),
         ("t.lora_B.weight", (rng.standard_t(3, size=(60, 8)) * 0.01).astype(np.float32))]
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_row", [False, True])
def test_stochastic_quantizer_is_unbiased_and_meets_qsgd_bound(bits, per_row):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    s, draws = levels(bits), 4000
    total = np.zeros_like(x, dtype=np.float64)
    sq_err = 0.0
    for _ in range(draws):
        codes, scale = quantize_stochastic(x, bits, rng, per_row)
        q = dequantize(codes, scale, bits, x.shape)
        total += q
        sq_err += float(((q - x) ** 2).sum())
    mean = total / draws
    # Per coordinate Var <= (scale/s)^2 / 4: the mean of `draws` samples is within
    # 5 standard errors of x (fails with probability < 1e-5 per coordinate).
    scale = np.abs(x).max(axis=1, keepdims=True) if per_row else np.abs(x).max()
    stderr = (scale / s) / 2 / np.sqrt(draws)
    assert np.all(np.abs(mean - x) <= 5 * stderr + 1e-7)
    n, norm2 = x.size, float((x**2).sum())
    qsgd = min(n / s**2, np.sqrt(n) / s) * norm2
    assert sq_err / draws <= qsgd


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_packing_is_exact_and_dense(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 1001):
        codes = rng.integers(0, 2**bits, size=n).astype(np.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == np.uint8 and len(packed) == -(-n * bits // 8)
        np.testing.assert_array_equal(unpack_bits(packed, bits, n), codes)


def test_codec_round_trips():
    upd, rng = _update(), np.random.default_rng(0)
    lay = layout_of(upd)
    exact = make_codec("fp32").decode(make_codec("fp32").encode(upd, rng), lay)
    for k in upd:
        np.testing.assert_array_equal(exact[k], upd[k])
    for spec, rtol in (("fp16", 1e-3), ("bf16", 1e-2)):
        out = make_codec(spec).decode(make_codec(spec).encode(upd, rng), lay)
        for k in upd:
            np.testing.assert_allclose(out[k], upd[k], rtol=rtol, atol=1e-6)
    # top-k keeps exactly the k largest magnitudes of each tensor, exactly.
    out = make_codec("topk0.1").decode(make_codec("topk0.1").encode(upd, rng), lay)
    for k, v in upd.items():
        kept = np.flatnonzero(out[k])
        assert len(kept) == int(np.ceil(0.1 * v.size))
        assert np.abs(v.reshape(-1))[kept].min() >= np.sort(np.abs(v.reshape(-1)))[-len(kept)]
        np.testing.assert_array_equal(out[k].reshape(-1)[kept], v.reshape(-1)[kept])


def test_payload_sizes_drop_and_indices_are_narrow():
    upd = _update(width=4000)  # adapter-sized: the ~128 B .npy header per array is noise
    fp32 = payload_bytes(make_codec("fp32").encode(upd, np.random.default_rng(0)))
    sizes = {s: payload_bytes(make_codec(s).encode(upd, np.random.default_rng(0))) for s in ("q8", "q4", "q2", "topk0.1+q8")}
    assert sizes["q8"] < 0.3 * fp32 and sizes["q4"] < 0.17 * fp32 and sizes["q2"] < 0.1 * fp32
    assert sizes["topk0.1+q8"] < 0.1 * fp32
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16 and index_dtype(70000) == np.uint32
    payload = make_codec("topk0.1").encode(_update(), np.random.default_rng(0))
    assert payload["index"].dtype == np.uint16  # 480-element tensors need 16 bits, not 64


def _flat(arrays) -> np.ndarray:
    return np.concatenate([v.reshape(-1) for v in arrays.values()])


@pytest.mark.parametrize("spec,multiple", [("q4-row", 2.0), ("topk0.1", 8.0), ("topk0.05+q2", 12.0)])
def test_error_feedback_residual_stays_within_a_multiple_of_one_updates_error(spec, multiple):
    """Error feedback promises: the residual stays O(the codec's error on one update), so what was sent tracks
    what should have been, while without it a biased codec's losses pile up. The multiples are about 1.5x the
    residual's measured level (1.2, 5.1 and 8.8 one-update errors; top-k's residual grows with 1/k): a residual
    that keeps part of what was sent (e += g - C(g + e) / 2) exceeds each, one never applied fails the last check."""
    codec, rng = make_codec(spec), np.random.default_rng(3)
    base = _update(5)

    def draw():
        return OrderedDict((k, v + 0.3 * rng.normal(size=v.shape).astype(np.float32)) for k, v in base.items())

    one = np.mean([np.linalg.norm(_flat(g) - _flat(codec.decode(codec.encode(g, rng), layout_of(g))))
                   for g in (draw() for _ in range(20))])
    residual, norms = None, []
    gap_with, gap_without = 0.0, 0.0  # sum of (what should have been sent - what was), from the decoded payloads
    for _ in range(300):
        g = draw()
        payload, residual = encode_with_feedback(codec, g, residual, rng)
        gap_with = gap_with + _flat(g) - _flat(codec.decode(payload, layout_of(g)))
        gap_without = gap_without + _flat(g) - _flat(codec.decode(codec.encode(g, rng), layout_of(g)))
        norms.append(np.linalg.norm(_flat(residual)))
    assert max(norms) <= multiple * one, f"residual reached {max(norms) / one:.1f}x one update's error"
    assert np.linalg.norm(gap_with) <= multiple * one
    if spec.startswith("topk"):  # biased: without feedback the dropped mass accumulates
        assert np.linalg.norm(gap_without) > 10 * multiple * one


@pytest.mark.parametrize(
    "spec, corrupt, message",
    [
        ("q4", lambda p: {**p, "extra": np.zeros(1)}, "payload keys"),
        ("q4", lambda p: {"codes": p["codes"]}, "payload keys"),
        ("q4", lambda p: {**p, "codes": p["codes"][:-1]}, "'codes' is uint8"),
        ("q4", lambda p: {**p, "codes": p["codes"].astype(np.int32)}, "'codes' is int32"),
        ("q4", lambda p: {**p, "scales": np.full_like(p["scales"], np.nan)}, "scales must be finite"),
        ("q8", lambda p: {**p, "codes": np.full_like(p["codes"], 255)}, "code out of range"),
        ("fp16", lambda p: {"values": np.full_like(p["values"], np.inf)}, "non-finite"),
        ("topk0.1", lambda p: {**p, "index": p["index"][::-1].copy()}, "not increasing"),
        ("topk0.1", lambda p: {**p, "index": np.full_like(p["index"], 65000)}, "out of range"),
        ("fp32", lambda p: {"values": p["values"].reshape(2, -1)}, "'values' is float32"),
        # oversized: a payload longer than the layout it claims is refused, not truncated
        ("fp32", lambda p: {"values": np.concatenate([p["values"], np.zeros(10**6, np.float32)])}, "'values' is float32"),
    ],
)
def test_malformed_payloads_are_rejected(spec, corrupt, message):
    upd = _update()
    codec = make_codec(spec)
    payload = corrupt(codec.encode(upd, np.random.default_rng(0)))
    with pytest.raises(CodecError, match=message):
        codec.decode(payload, layout_of(upd))


def test_layout_arrays_round_trip_and_reject_garbage():
    lay = layout_of(_update())
    assert layout_from_arrays(layout_arrays(lay)) == lay
    bad = layout_arrays(lay)
    bad["layout-shapes"] = bad["layout-shapes"][:-1]
    with pytest.raises(CodecError):
        layout_from_arrays(bad)


def test_bad_specs_are_clear_errors():
    for spec in ("q3", "topk2+q8", "int8", "q8+topk0.1", ""):
        with pytest.raises(ValueError, match="codec"):
            make_codec(spec)


# -- Flower side: the ClientApp mod and the server wrapper ---------------------------------


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    return TaskIdentity


def _train_message(arrays: ArrayRecord, config: dict, node: int = 1) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def test_mod_encodes_delta_with_feedback_and_wire_bytes_match():
    glob, local = _update(0), _update(1)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    config = {"codec-up": "topk0.2+q4", "codec-down": "fp32", "error-feedback": True, "codec-seed": 0}
    seen = {}

    def handler(msg, ctx):
        seen["arrays"] = to_numpy(msg.content["arrays"])
        return Message(RecordDict({"arrays": to_record(local), "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    sent = to_record(encode_self_describing(make_codec("fp32"), glob, np.random.default_rng(0)))
    reply = compression_mod(_train_message(sent, config), context, handler)
    payload = to_numpy(reply.content["arrays"])
    assert set(payload) == {"index", "codes", "scales"}
    # What Flower counts on the wire equals the codec's own count.
    assert reply.content["arrays"].count_bytes() == reply.content["metrics"]["bytes-uplink"] == payload_bytes(payload)
    codec = make_codec("topk0.2+q4")
    delta = codec.decode(payload, layout_of(glob))
    residual = to_numpy(context.state[RESIDUAL_KEY])
    for k in glob:  # sent + residual == the true delta (error feedback bookkeeping)
        np.testing.assert_allclose(delta[k] + residual[k], local[k] - glob[k], atol=1e-5)
    np.testing.assert_array_equal(seen["arrays"]["t.lora_A.weight"], glob["t.lora_A.weight"])


def test_mod_decodes_a_compressed_downlink():
    glob = _update(0)
    codec = make_codec("q8")
    payload = codec.encode(glob, np.random.default_rng(0))
    sent = to_record(encode_self_describing(codec, glob, np.random.default_rng(0)))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    seen = {}

    def handler(msg, ctx):
        seen["arrays"] = to_numpy(msg.content["arrays"])
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    msg = _train_message(sent, {"codec-down": "q8"})
    msg.metadata.message_type = MessageType.EVALUATE
    compression_mod(msg, context, handler)
    expected = codec.decode(payload, layout_of(glob))
    assert list(seen["arrays"]) == list(glob)
    for k in glob:
        np.testing.assert_array_equal(seen["arrays"][k], expected[k])


class _Grid:
    def get_node_ids(self):
        return [11, 12, 13]


def test_wrapper_drops_a_malformed_update_and_aggregates_the_rest(task_identity):
    glob = _update(0)
    wrapper = CompressedUpdates(FedAvg(min_available_nodes=3, min_train_nodes=3), uplink=make_codec("q8"), error_feedback=False)
    messages = list(wrapper.configure_train(1, to_record(glob), ConfigRecord({}), _Grid()))
    assert len(messages) == 3 and messages[0].content["config"]["codec-up"] == "q8"
    codec, rng = make_codec("q8"), np.random.default_rng(0)
    replies, locals_ = [], []
    for i, msg in enumerate(messages):
        task_identity._node_id = msg.metadata.dst_node_id
        local = OrderedDict((k, v + (i + 1) * 0.1) for k, v in glob.items())
        delta = OrderedDict((k, local[k] - glob[k]) for k in glob)
        payload = codec.encode(delta, rng) if i < 2 else {"codes": np.zeros(3, np.uint8), "scales": np.zeros(1, np.float32)}
        replies.append(Message(RecordDict({"arrays": to_record(payload), "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg))
        locals_.append(local)
    arrays, _metrics = wrapper.aggregate_train(1, reversed(replies))
    assert wrapper.stats[1]["dropped-updates"] == 1
    out = to_numpy(arrays)
    for k in glob:  # the mean of the two good updates, to quantization precision
        np.testing.assert_allclose(out[k], (locals_[0][k] + locals_[1][k]) / 2, atol=0.02)


def test_fp32_downlink_is_a_few_concatenated_arrays_that_decode_exactly(task_identity):
    # Flower moves each array of a message as its own object (one SuperLink request per node
    # each), so the wire must not grow with the adapter's tensor count.
    glob = OrderedDict((f"layer{i}.lora_A.weight", np.random.default_rng(i).normal(size=(4, 6)).astype(np.float32))
                       for i in range(40))
    wrapper = CompressedUpdates(FedAvg(min_available_nodes=3, min_train_nodes=3))
    sent = [m.content["arrays"] for m in wrapper.configure_train(1, to_record(glob), ConfigRecord({}), _Grid())]
    assert all(len(record) <= 3 for record in sent)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    seen = {}

    def handler(msg, ctx):
        seen.update(to_numpy(msg.content["arrays"]))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    msg = _train_message(sent[0], {"codec-down": "fp32"})
    msg.metadata.message_type = MessageType.EVALUATE
    compression_mod(msg, context, handler)
    assert list(seen) == list(glob)
    for k in glob:
        np.testing.assert_array_equal(seen[k], glob[k])
