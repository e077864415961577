"""No reply can crash or end a run: a fuzz test of the server's whole strategy chain.

Every round mixes honest replies (what fedmm's ClientApp sends, encoded with
the run's codec) with hostile ones: every record type under every key, random
bytes as arrays, wrong dtypes and lengths, NaN / negative / huge / fractional
weights, missing records, extra and missing metric keys. The chain is the one
``server.chain.make_strategy`` builds. No exception may escape
``aggregate_train`` / ``aggregate_evaluate``, and the result must equal, bit
for bit, what the same chain gives for the honest replies alone.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmm.compression import make_codec
from fedmm.config import Settings
from server.chain import find_wrapper, make_strategy
from server.history import MetricsHistory
from fedmm.protocol import to_numpy, to_record
from strategies.replies import ReplyCheck
from conftest import honest_metrics

RANK = 4
HONEST = 5
HOSTILE = 12
ROUNDS = 20  # 20 rounds x 12 hostile x 2 phases x 6 chains: 2,880 hostile replies


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _global() -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict([("m.lora_A.weight", rng.normal(size=(RANK, 6)).astype(np.float32)),
                        ("m.lora_B.weight", rng.normal(size=(5, RANK)).astype(np.float32) * 0.1)])


class _Grid:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def _honest_train(msg: Message, node: int, rnd: int, codec: str) -> Message:
    rng = np.random.default_rng([node, rnd])
    delta = OrderedDict((k, (0.01 * rng.normal(size=v.shape)).astype(np.float32)) for k, v in _global().items())
    payload = make_codec(codec).encode(delta, np.random.default_rng([node, rnd, 1]))
    metrics = MetricRecord(honest_metrics(**{"num-examples": 10 + node, "partition-id": node - 1, "lora-rank": RANK,
                                              "train-loss": 1.0 / node, "bytes-uplink": 100}))
    return Message(RecordDict({"arrays": to_record(payload), "metrics": metrics}), reply_to=msg)


def _honest_evaluate(msg: Message, node: int, rnd: int) -> Message:
    metrics = MetricRecord(honest_metrics("evaluate", **{"num-examples": 20 + node, "partition-id": node - 1,
                                                         "zs-acc": (node * rnd % 7) / 7, "loss": 1.0 + node,
                                                         "fair-n-g0-c0": node}))
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _random_array(rng: random.Random) -> Array:
    kind = rng.randrange(4)
    if kind == 0:  # random bytes claiming to be a float32 array
        return Array(dtype="float32", shape=(rng.randrange(1, 50),), stype="numpy.ndarray",
                     data=rng.randbytes(rng.randrange(0, 300)))
    if kind == 1:
        return Array(dtype="object", shape=(3,), stype="numpy.ndarray", data=rng.randbytes(64))
    if kind == 2:
        return Array(dtype="float32", shape=(4,), stype="torch.raw", data=rng.randbytes(16))
    dtype = rng.choice([np.float64, np.int64, np.uint8, np.float16, np.complex64])
    return Array(np.asarray(np.random.default_rng(rng.randrange(1000)).normal(size=rng.randrange(1, 40))).astype(dtype))


def _bad_payload(rng: random.Random, codec: str, node: int, rnd: int) -> dict[str, object]:
    """A payload of the run's codec, broken one way: wrong name, dtype, length, NaN, inf scale, extra array."""
    good = dict(to_numpy(_honest_train(_instruction(node), node, rnd, codec).content["arrays"]))
    key = rng.choice(sorted(good))
    kind = rng.randrange(7)
    if kind == 0:
        good["renamed"] = good.pop(key)
    elif kind == 1:
        good[key] = good[key].astype(np.float64)
    elif kind == 2:
        good[key] = good[key][: max(0, len(good[key]) - rng.randrange(1, 4))]
    elif kind == 3:
        good[key] = np.concatenate([good[key], good[key][:3]])
    elif kind == 4:
        vals = good[key].copy()
        if vals.dtype.kind == "f":
            vals[rng.randrange(len(vals))] = rng.choice([np.nan, np.inf, -np.inf])
        else:  # packed codes (or bf16 bits): all ones is out of every code range and a bf16 NaN
            vals[rng.randrange(len(vals))] = np.iinfo(vals.dtype).max
        good[key] = vals
    elif kind == 5:
        if "scales" in good:
            good["scales"] = np.full_like(good["scales"], np.float32(3e38))
        elif good[key].dtype.kind == "f":
            good[key] = np.full_like(good[key], np.nan)
        else:
            good[key] = np.full_like(good[key], np.iinfo(good[key].dtype).max)
    else:
        good["extra"] = np.zeros(3, np.float32)
    return good


def _instruction(node: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=kind)


def _bad_metrics(rng: random.Random, phase: str, node: int) -> MetricRecord:
    base = honest_metrics(**{"num-examples": 10, "partition-id": node - 1, "train-loss": 0.5, "bytes-uplink": 100})
    if phase == "evaluate":
        base = honest_metrics("evaluate", **{"num-examples": 10, "partition-id": node - 1, "zs-acc": 0.5,
                                             "loss": 1.0, "fair-n-g0-c0": 3})
    else:
        base["lora-rank"] = RANK
    kind = rng.randrange(10)
    key = rng.choice(["num-examples", "unit-weight", "partition-id"] + (["lora-rank"] if phase == "train" else []))
    if kind == 0:  # (a well-formed zs-acc of 0.3 is a lie, not a malformed reply: the robust rules' business)
        base[key] = rng.choice([float("nan"), float("inf"), -1, 1e30, 2.5, -(2**40), 10**12]
                               + ([0] if phase == "train" and key == "num-examples" else []))
    elif kind == 1:
        base[key] = rng.choice([[1, 2], [0.5], []])
    elif kind == 2:
        base.pop(key, None)
    elif kind == 3:  # an extra key alone is stripped and the reply kept; here it is also of the wrong type
        base[f"fair-n-g{rng.randrange(10**6)}-c{rng.randrange(10**6)}"] = [1, 2]
    elif kind == 4:
        base.pop(rng.choice(sorted(base)))
    elif kind == 5:  # (on an evaluate reply lora-rank is just an extra key, stripped: break its weight instead)
        base["lora-rank" if phase == "train" else "num-examples"] = rng.choice([-2, RANK + 10**9, 10**12])
    elif kind == 6:
        base["partition-id"] = rng.choice([[3], -5, 2**40, 1.5])
    elif kind == 7:
        base[rng.choice(sorted(base))] = float(rng.choice([1e300, -1e300, float("nan")]))
    elif kind == 8:
        base = {}
    else:
        base = {f"k{i}": rng.random() for i in range(rng.randrange(5))}
    return MetricRecord(base)


def _hostile(rng: random.Random, msg: Message, phase: str, codec: str, node: int, rnd: int) -> Message:
    """One malformed reply of many kinds; every reply here must be dropped."""
    records = [lambda: ArrayRecord({"x": _random_array(rng)}),
               lambda: ConfigRecord({"partition-id": "three", "num-examples": "ten"}),
               lambda: _bad_metrics(rng, phase, node),
               lambda: ArrayRecord(),
               lambda: to_record(_bad_payload(rng, codec, node, rnd))]
    kind = rng.randrange(6)
    if phase == "train" and kind == 0:  # a good payload with broken metrics
        reply = _honest_train(msg, node, rnd, codec)
        return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": _bad_metrics(rng, phase, node)}),
                       reply_to=msg)
    if phase == "train" and kind in (1, 4):  # good metrics with a broken payload
        good = _honest_train(msg, node, rnd, codec).content["metrics"]
        arrays = rng.choice([lambda: to_record(_bad_payload(rng, codec, node, rnd)),
                             lambda: ArrayRecord({"x": _random_array(rng)}), lambda: ArrayRecord()])()
        return Message(RecordDict({"arrays": arrays, "metrics": good}), reply_to=msg)
    if kind == 2:  # a record of any type under any key, possibly several
        content = RecordDict({rng.choice(["arrays", "metrics", "config", "x"]): rng.choice(records)()
                              for _ in range(rng.randrange(0, 4))})
        if phase == "evaluate" and set(content.keys()) == {"metrics"} and isinstance(content["metrics"], MetricRecord):
            content["metrics"] = _bad_metrics(rng, phase, node)
        if phase == "train" and set(content.keys()) == {"arrays", "metrics"}:
            content["config"] = ConfigRecord({})  # still an extra record
        return Message(content, reply_to=msg)
    if kind == 3:  # the right records plus an extra one
        good = (_honest_train(msg, node, rnd, codec) if phase == "train" else _honest_evaluate(msg, node, rnd)).content
        good[rng.choice(["config", "more-metrics", "more-arrays"])] = rng.choice(records)()
        return Message(good, reply_to=msg)
    if kind == 4 and phase == "evaluate":  # honest but with arrays too
        good = _honest_evaluate(msg, node, rnd).content
        good["arrays"] = ArrayRecord({"x": _random_array(rng)})
        return Message(good, reply_to=msg)
    if phase == "train":  # the right records, broken metrics
        reply = _honest_train(msg, node, rnd, codec)
        return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": _bad_metrics(rng, phase, node)}),
                       reply_to=msg)
    return Message(RecordDict({"metrics": _bad_metrics(rng, phase, node)}), reply_to=msg)


def _run(settings: Settings, with_hostile: bool, seed: int):
    """ROUNDS rounds of the chain; returns every round's aggregated arrays and metrics, and the chain."""
    chain = make_strategy(settings, MetricsHistory(), num_nodes=HONEST + (HOSTILE if with_hostile else 0))
    ids = list(range(1, HONEST + 1 + (HOSTILE if with_hostile else 0)))
    rng = random.Random(seed)
    arrays = to_record(_global())
    results = []
    for rnd in range(1, ROUNDS + 1):
        random.seed(rnd)
        messages = list(chain.configure_train(rnd, arrays, ConfigRecord({}), _Grid(ids)))
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            replies.append(_honest_train(msg, node, rnd, settings.codec) if node <= HONEST
                           else _hostile(rng, msg, "train", settings.codec, node, rnd))
        rng.shuffle(replies)
        new, train_metrics = chain.aggregate_train(rnd, replies)
        if new is not None:
            arrays = new
        messages = list(chain.configure_evaluate(rnd, arrays, ConfigRecord({}), _Grid(ids)))
        replies = [_honest_evaluate(m, m.metadata.dst_node_id, rnd) if m.metadata.dst_node_id <= HONEST
                   else _hostile(rng, m, "evaluate", settings.codec, m.metadata.dst_node_id, rnd) for m in messages]
        rng.shuffle(replies)
        eval_metrics = chain.aggregate_evaluate(rnd, replies)
        results.append((to_numpy(new) if new is not None else None,
                        dict(train_metrics) if train_metrics is not None else None,
                        dict(eval_metrics) if eval_metrics is not None else None))
    return results, chain


CHAINS = [
    {"strategy": "fedavg", "codec": "fp32"},
    {"strategy": "fedavg", "codec": "q4"},
    {"strategy": "fedadam", "codec": "topk0.3+q8"},
    {"strategy": "fedmedian", "codec": "fp16"},
    {"strategy": "krum", "codec": "q8-row", "strategy-args": "num_malicious_nodes=1"},
    {"strategy": "hetlora", "codec": "bf16"},
]


@pytest.mark.parametrize("run_config", CHAINS, ids=[f"{c['strategy']}-{c['codec']}" for c in CHAINS])
def test_hostile_replies_never_escape_and_never_change_the_honest_aggregate(run_config):
    settings = Settings.from_run_config({**run_config, "lora-rank": RANK, "min-nodes": 2})
    honest, _ = _run(settings, with_hostile=False, seed=1)
    mixed, chain = _run(settings, with_hostile=True, seed=1)
    for rnd, ((arrays_h, train_h, eval_h), (arrays_m, train_m, eval_m)) in enumerate(zip(honest, mixed), 1):
        assert arrays_h is not None, f"round {rnd}: the honest replies alone aggregated nothing"
        assert arrays_m is not None and list(arrays_m) == list(arrays_h)
        for key in arrays_h:
            np.testing.assert_array_equal(arrays_m[key], arrays_h[key], err_msg=f"round {rnd}: '{key}'")
        assert train_m == train_h, f"round {rnd}: train metrics"
        assert eval_m == eval_h, f"round {rnd}: evaluate metrics"
    check = find_wrapper(chain, ReplyCheck)
    # every hostile reply was dropped, with the round, the node and a reason
    assert len(check.drops) + sum(len(d) for d in _other_drops(chain)) == 2 * ROUNDS * HOSTILE
    assert all(d["reason"] and d["node"] > HONEST for d in check.drops)


def _other_drops(chain) -> list[list]:
    """Drops recorded below ReplyCheck (payloads that do not decode, non-finite updates)."""
    from strategies.compression import CompressedUpdates
    from strategies.validation import UpdateValidation

    return [find_wrapper(chain, CompressedUpdates).drops, find_wrapper(chain, UpdateValidation).drops]


def test_a_reply_with_different_metric_keys_is_dropped_not_the_run():
    """Flower's FedAvg ends the whole run (InconsistentMessageReplies) when replies' metric keys differ."""
    settings = Settings.from_run_config({"lora-rank": RANK, "min-nodes": 2})
    chain = make_strategy(settings, MetricsHistory(), num_nodes=4)
    random.seed(0)
    messages = list(chain.configure_train(1, to_record(_global()), ConfigRecord({}), _Grid([1, 2, 3, 4])))
    replies = [_honest_train(m, m.metadata.dst_node_id, 1, "fp32") for m in messages]
    del replies[0].content["metrics"]["train-loss"]  # one reply lacks a key
    replies[1].content["metrics"]["surprise"] = 1.0  # one has an extra key
    arrays, metrics = chain.aggregate_train(1, replies)
    assert arrays is not None and "surprise" not in metrics
    drops = find_wrapper(chain, ReplyCheck).drops
    assert [(d["round"], d["node"]) for d in drops] == [(1, messages[0].metadata.dst_node_id)]
    assert "train-loss" in drops[0]["reason"]


def test_records_stay_in_their_round_after_a_round_that_aggregates_nothing():
    """Round 1 gets only failures (nothing aggregated, no metric hook called); round 2's records are round 2's."""
    from flwr.app import Error

    settings = Settings.from_run_config({"lora-rank": RANK, "min-nodes": 2})
    history = MetricsHistory()
    chain = make_strategy(settings, history, num_nodes=3)
    arrays = to_record(_global())
    for rnd in (1, 2):
        random.seed(rnd)
        messages = list(chain.configure_train(rnd, arrays, ConfigRecord({}), _Grid([1, 2, 3])))
        if rnd == 1:
            replies = [Message(Error(code=1, reason="crashed"), reply_to=m) for m in messages]
        else:
            replies = [_honest_train(m, m.metadata.dst_node_id, rnd, "fp32") for m in messages]
        new, _ = chain.aggregate_train(rnd, replies)
        assert (new is None) == (rnd == 1)
    assert not any(k.startswith("train/") for k in history.rounds.get(1, {}))
    assert history.rounds[2]["train/num-replies"] == 3
    assert {row["round"] for row in history.clients} == {2}
