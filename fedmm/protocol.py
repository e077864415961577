"""The wire protocol: every record and metric key fedmm's ServerApp and ClientApp exchange, defined once.

Server, clients and strategies import this module for every key they put in
or read from a message; no other module spells one. It also holds what both
sides need to read a message the same way: the bounds a reply must keep (what
``strategies.replies.ReplyCheck`` enforces before anything else on the server
reads it), how LoRA tensors are named (peft's keys), and the ArrayRecord <->
numpy conversion.

Who sets what, per round:
- server -> client, train config: the round's training parameters (``LR``,
  ``LOCAL_OPTIMIZER``, ``PROXIMAL_MU``, the server's ``LOCAL_STEPS`` and
  ``BATCH_SIZE``, which a client follows except where its tier sets less),
  ``BASE_FINGERPRINT``,
  the codecs (``CODEC_*``), the DP parameters the server may set
  (``DP_*``; Flower's own clipping-norm key for central-client), the
  constraint multipliers (``multiplier_key``), ``REPORT_TRAIN_LOSS``;
- client -> server, train reply: ``ARRAYS`` (the encoded update) and
  ``METRICS`` with ``NUM_EXAMPLES``, ``UNIT_WEIGHT``, ``PARTITION_ID`` and
  ``LORA_RANK`` (the rank it trained: explicit, never inferred);
- a site's own node config: its data, its device, its tier (``NODE_PROFILE``) and its
  privacy floor (``NODE_*``), which no server can change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# --- RecordDict keys of a message
ARRAYS = "arrays"  # ArrayRecord: the global adapter (server -> client) or the encoded update (client -> server)
METRICS = "metrics"  # MetricRecord of a reply
CONFIG = "config"  # ConfigRecord of an instruction

# --- train / evaluate config (server -> client)
SERVER_ROUND = "server-round"  # set by Flower's strategies
LR = "lr"
LOCAL_OPTIMIZER = "local-optimizer"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"
BASE_FINGERPRINT = "base-fingerprint"  # the client refuses to train on a different frozen base
REPORT_TRAIN_LOSS = "report-train-loss"  # QFedAvg: the client reports its loss of the global model
CODEC_UP = "codec-up"  # the uplink codec spec (fedmm.compression.make_codec)
CODEC_DOWN = "codec-down"  # the codec of the global adapter in this message
CODEC_SEED = "codec-seed"  # seeds stochastic rounding (with the round and the client's partition)
ERROR_FEEDBACK = "error-feedback"
MULTIPLIER = "multiplier-{}"  # a constraint's current multiplier, by constraint name
CONSTRAINTS = ("group-gap", "toxicity")  # the constraints a server may send multipliers for


def multiplier_key(constraint: str) -> str:
    return MULTIPLIER.format(constraint)


# client-side DP (strategies/privacy.py sends, clients/privacy_mod.py acts)
DP_MODE = "dp-mode"  # "local" | "distributed": the client clips and noises its own update
DP_CLIP_NORM = "dp-clip-norm"  # C: the update is clipped to this L2 norm
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # sigma: local adds N(0, sigma^2 C^2)
DP_NOISE_SHARES = "dp-noise-shares"  # distributed: n, each client adds N(0, sigma^2 C^2 / n)
DP_DELTA = "dp-delta"
DP_MAX_EPSILON = "dp-max-epsilon"  # local: the client's ledger must stay within it (0 = none)
CLIENT_DP_MODES = ("local", "distributed")

# secure aggregation (strategies/secure_aggregation.py asks, clients/secagg_mod.py answers; fedmm.secagg computes):
# with SECAGG true in the train config a client keeps its encoded update and replies with two public keys
# under the SECAGG record instead of ARRAYS; then three stage messages of type SECAGG_STAGES follow, each
# with a SECAGG record naming its SA_STAGE. Node ids travel as uint64 bytes (fedmm.secagg.masking.ids_bytes).
SECAGG = "secagg"  # train config flag, and the ConfigRecord of every secure-aggregation request and reply
SECAGG_ACTION = "secagg"  # the ClientApp's query handler for the stages
SECAGG_STAGES = f"query.{SECAGG_ACTION}"  # message type of the stages
SA_STAGE = "stage"  # "share" | "mask" | "unmask"
SA_ROUND = "round"
SA_C_KEY, SA_S_KEY = "c-pk", "s-pk"  # train reply: the encryption and mask-agreement public keys
SA_IDS, SA_C_KEYS, SA_S_KEYS = "ids", "c-pks", "s-pks"  # share request: the neighbourhood's keys
SA_THRESHOLD, SA_BITS, SA_LENGTH = "threshold", "bits", "length"  # share request
SA_TO, SA_FROM, SA_CIPHERTEXTS = "to", "from", "ciphertexts"  # share reply / mask request: shares by holder / source
SA_COMMITMENT = "commitment"  # share reply: SHA-256 of the self-mask seed
SA_WEIGHT = "weight"  # mask request: the factor in [0, 1] the client scales its update by
SA_CODE = "code-"  # prefix of the mask request's integer code fields (fedmm.secagg.IntegerCode.as_dict)
SA_MASKED = "masked"  # mask reply, under ARRAYS: the masked ring vector
SA_CONTRIBUTORS, SA_DROPPED = "contributors", "dropped"  # unmask request
SA_OWNERS, SA_SHARES = "owners", "shares"  # unmask reply

# --- a codec payload's arrays (fedmm.compression: the encoded update under ARRAYS, and the encoded global)
PAYLOAD_VALUES = "values"  # dense values (fp32, fp16, bf16 bits); secure aggregation takes the fp32 codec's
PAYLOAD_CODES, PAYLOAD_SCALES = "codes", "scales"  # quantized: packed codes and per-row scales
PAYLOAD_INDEX = "index"  # top-k: the kept positions

# --- metric keys of a reply (client -> server)
NUM_EXAMPLES = "num-examples"  # examples the client trained (train) or evaluated (evaluate) on
UNIT_WEIGHT = "unit-weight"  # always 1: the weight of a uniform mean (client-level DP)
# Set by the server, never sent by a client: asynchronous aggregation's annotations of a buffered reply
AGGREGATION_WEIGHT = "aggregation-weight"  # num-examples x the staleness weight s(tau)
STALENESS = "staleness"  # tau: global versions applied since the client's model was sent
TRAINED_ON = "trained-on-version"  # the global version the client trained on
PARTITION_ID = "partition-id"  # the client's partition (simulation) or site index: the aggregation order
LORA_RANK = "lora-rank"  # the rank the client trained (its reply is zero-padded to the global rank)
TRAIN_LOSS = "train-loss"
CONTRASTIVE_LOSS = "contrastive-loss"
GLOBAL_TRAIN_LOSS = "train_loss"  # QFedAvg's F_k(w_global), Flower's key for it
BYTES_UPLINK = "bytes-uplink"  # payload bytes of the update (summed per round by the server)
ENCODE_SECONDS = "encode-seconds"
UPDATE_NORM = "update-norm"  # before clipping: never sent under DP (fedmm/privacy/release.py)
CLIPPED = "clipped"  # secure aggregation without DP: clipping to secagg-clip-norm bound
DP_EPSILON = "dp-epsilon"  # the client's own ledger (dp-sgd, local)
DP_SAMPLE_RATE = "dp-sample-rate"
CONSTRAINT_STAT = "cstat-"  # prefix: the constraint statistics a server sums for dual ascent
TRAIN_SECONDS = "train-seconds"
STEP_SECONDS = "step-seconds"
STEPS_DONE = "steps-done"
WORK_FRACTION = "work-fraction"  # steps done / steps planned (< 1: the tier's time budget cut training short)
# an evaluate reply: these scalars (fedmm.evaluate names them), plus the counts the server sums
ZS_ACC = "zs-acc"
# the audit (fedmm/audit.py): robust accuracy and prediction agreement under each perturbation, and the mean cosine
# between an image's embedding and its caption's; the server's evaluation and the clients' both report them
AUDIT_PERTURBATIONS = ("noise", "blur")
ROBUST_ACC, CONSISTENCY_AGREEMENT, CONSISTENCY_COSINE = "robust-acc-", "consistency-agreement-", "consistency-cosine"
AUDIT_SCALARS = (CONSISTENCY_COSINE, *(f"{prefix}{kind}" for kind in AUDIT_PERTURBATIONS
                                      for prefix in (ROBUST_ACC, CONSISTENCY_AGREEMENT)))
EVALUATE_SCALARS = (ZS_ACC, "loss", "i2t-R@1", "t2i-R@1", "i2t-mrr", "t2i-mrr", "grounding", *AUDIT_SCALARS)
EVALUATE_COUNTS = ("fair-", "tox-")  # prefixes: per (group, class) counts and toxic-retrieval counts

# --- methods with a client half (fedmm/methods/)
METHOD = "method"  # train and evaluate config: the method whose client half the client must run
PERSONAL = "personal-"  # evaluate-reply prefix: a metric of parameters that never leave the client (mean and worst)
METHOD_ARRAY = "@"  # a method's array beside adapter array K in the global record and replies: K + "@<name>"
SCAFFOLD_CONTROL = METHOD_ARRAY + "scaffold-c"  # SCAFFOLD's control variate c (global) / c + delta c_i (reply)
DITTO_LAMBDA = "ditto-lambda"  # train config: Ditto's pull of the personal adapter towards the global one

# --- a site's node config (--node-config): its own, never the server's
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_PROFILE = "profile"  # its tier in client-profiles
NODE_DATASET = "dataset"  # the site's own manifest: the node trains and evaluates on it and opens nothing else
NODE_DEVICE = "device"  # the site's own device (auto, cpu, cuda, cuda:N): its hardware is its business
NODE_DECODED_IMAGES_MIB = "decoded-images-mib"  # memory this process may spend on decoded image files (default 1024)
DEFAULT_DECODED_IMAGES_MIB = 1024
NODE_MIN_NOISE_MULTIPLIER = "dp-min-noise-multiplier"  # a request below it is declined
NODE_MAX_EPSILON = "dp-max-epsilon"
NODE_DELTA = "dp-delta"


class NodeKey(NamedTuple):
    """One node-config key as the reference lists it (docs/reference/node-config.md)."""

    type: type
    default: Any  # None: unset unless the site sets it
    help: str


NODE_CONFIG: dict[str, NodeKey] = {
    NODE_PARTITION_ID: NodeKey(int, None, "which partition of the run's 'dataset' this node trains on, and the id "
                               "its replies, codec seed and tier go by (default: its node id, when it brings its "
                               "own 'dataset')"),
    NODE_NUM_PARTITIONS: NodeKey(int, None, "how many partitions the run's 'dataset' is cut into (simulation and "
                                 "rehearsals that slice one dataset)"),
    NODE_PROFILE: NodeKey(str, None, "its tier: a name in the run's 'client-profiles' (else the run's "
                          "'partition-profiles' cycle picks one)"),
    NODE_DATASET: NodeKey(str, None, "the site's own manifest (CSV or JSONL over an image folder): the node "
                          "trains and evaluates on it and opens no other data"),
    NODE_DEVICE: NodeKey(str, None, "where this site computes: auto | cpu | cuda | cuda:N; overrides the run's "
                         "'device', and a site without the device the run asks for declines naming this key"),
    NODE_DECODED_IMAGES_MIB: NodeKey(float, DEFAULT_DECODED_IMAGES_MIB, "memory (MiB) the ClientApp process may "
                                     "spend on decoded image files, over its nodes; a site whose images fit is "
                                     "decoded once, a larger one per batch as it is drawn"),
    NODE_MIN_NOISE_MULTIPLIER: NodeKey(float, None, "the site's privacy floor: a request for less noise than "
                                       "this (or for none) is declined with the reason"),
    NODE_MAX_EPSILON: NodeKey(float, None, "the site's own epsilon budget for its local-DP ledger: a round that "
                              "would exceed it (or the run's max-epsilon, whichever is smaller) is declined"),
    NODE_DELTA: NodeKey(float, None, "the delta of the site's own ledger (the smaller of it and the run's)"),
}

# --- bounds of a well-formed reply
MAX_EXAMPLES = 10**9  # an honest site holds fewer; more is a weight meant to swamp the mean
MAX_PARTITION_ID = 2**31 - 1
MAX_METRIC_MAGNITUDE = 1e15  # every honest metric (counts, bytes, seconds, losses) is far below


def partition_id_of(node_config: Mapping[str, Any], node_id: int) -> int:
    """The id a client goes by (in its replies, its codec seed, its tier): its node config's ``partition-id``;
    a site that gives none (it brings its own data) goes by its node id, folded into the replies' range."""
    if NODE_PARTITION_ID in node_config:
        return int(node_config[NODE_PARTITION_ID])
    return int(node_id) % MAX_PARTITION_ID

# --- LoRA tensors on the wire (peft's state-dict keys)
# <layer>.lora_A.weight: A, (r, in) or (r, in, 1, 1) for a 1x1 conv; <layer>.lora_B.weight: B, (out, r) or
# (out, r, 1, 1). Downlink-only (server -> client, never in a reply): a frozen update the client adds, times
# the LoRA scale, to the layer's base weight, as factors lora_frozen_B @ lora_frozen_A or dense lora_frozen_W
# (FLoRA's merge).
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
FROZEN_A, FROZEN_B, FROZEN_W = ".lora_frozen_A", ".lora_frozen_B", ".lora_frozen_W"
DOWNLINK_ONLY = (FROZEN_A, FROZEN_B, FROZEN_W)


def is_downlink_only(key: str) -> bool:
    return key.endswith(DOWNLINK_ONLY)


def trainable(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The arrays a reply carries: all but the downlink-only ones."""
    return OrderedDict((k, v) for k, v in arrays.items() if not is_downlink_only(k))


def trainable_size(arrays: ArrayRecord) -> int:
    """Values one update holds: the trainable arrays' sizes, read off their shapes (nothing deserialized)."""
    return sum(int(np.prod(a.shape)) for k, a in arrays.items() if not is_downlink_only(k))


def rank_of(arrays: Mapping) -> int:
    """The LoRA rank of named arrays (numpy or Flower ``Array``): rows of the first A factor."""
    for key in arrays.keys():
        if key.endswith(A_SUFFIX):
            return int(arrays[key].shape[0])
    raise ValueError("the arrays hold no LoRA adapter (no '*.lora_A.weight')")


def layer_of(key: str) -> str:
    for suffix in (A_SUFFIX, B_SUFFIX, *DOWNLINK_ONLY):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"'{key}' is not a LoRA key")


# --- ArrayRecord <-> ordered numpy dicts
def to_numpy(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    from flwr.app import Array, ArrayRecord  # here: the library's torch/numpy modules import the key names only

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})



# a MetricRecord's value type, as Flower declares it
MetricValue = int | float | list[int] | list[float]


# --- typed reads: a record's value as the type the protocol gives it (ValueError naming the key otherwise)
def as_number(value: object, key: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    raise ValueError(f"'{key}' = {value!r}: expected a number")


def number(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    return as_number(record.get(key, default), key)


def integer(record: Mapping[str, Any], key: str, default: int | None = None) -> int:
    return int(number(record, key, default))


def text(record: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = record.get(key, default)
    if isinstance(value, str):
        return value
    raise ValueError(f"'{key}' = {value!r}: expected a string")


def blob(record: Mapping[str, Any], key: str) -> bytes:
    value = record.get(key)
    if isinstance(value, bytes):
        return value
    raise ValueError(f"'{key}': expected bytes, got {type(value).__name__}")


def blobs(record: Mapping[str, Any], key: str) -> list[bytes]:
    value = record.get(key)
    if isinstance(value, list) and all(isinstance(v, bytes) for v in value):
        return list(value)
    raise ValueError(f"'{key}': expected a list of bytes, got {type(value).__name__}")


def arrays_in(content: RecordDict, key: str = ARRAYS) -> ArrayRecord:
    from flwr.app import ArrayRecord

    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"'{key}' holds a {type(record).__name__}, not an ArrayRecord")
    return record


def config_in(content: RecordDict, key: str = CONFIG) -> ConfigRecord:
    from flwr.app import ConfigRecord

    record = content[key]
    if not isinstance(record, ConfigRecord):
        raise ValueError(f"'{key}' holds a {type(record).__name__}, not a ConfigRecord")
    return record


def metrics_in(content: RecordDict, key: str = METRICS) -> MetricRecord:
    from flwr.app import MetricRecord

    record = content[key]
    if not isinstance(record, MetricRecord):
        raise ValueError(f"'{key}' holds a {type(record).__name__}, not a MetricRecord")
    return record
