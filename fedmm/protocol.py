"""The record and metric keys fedmm's ServerApp and ClientApp exchange, and the bounds a reply must keep.

Both sides import this module (it imports nothing), so a key is spelled in
one place. The bounds are what ``strategies.replies.ReplyCheck`` enforces on
every reply before anything else on the server reads it.
"""

from __future__ import annotations

# RecordDict keys of a message
ARRAYS = "arrays"  # ArrayRecord: the global adapter (server -> client) or the encoded update (client -> server)
METRICS = "metrics"  # MetricRecord of a reply
CONFIG = "config"  # ConfigRecord of an instruction

# metric keys every reply carries
NUM_EXAMPLES = "num-examples"  # examples the client trained (train) or evaluated (evaluate) on
UNIT_WEIGHT = "unit-weight"  # always 1: the weight of a uniform mean (client-level DP)
PARTITION_ID = "partition-id"  # the client's partition (simulation) or site index: the aggregation order

# bounds of a well-formed reply
MAX_EXAMPLES = 10**9  # an honest site holds fewer; more is a weight meant to swamp the mean
MAX_PARTITION_ID = 2**31 - 1
MAX_METRIC_MAGNITUDE = 1e15  # every honest metric (counts, bytes, seconds, losses) is far below

# client-side DP in the train config (strategies/privacy.py sends, clients/mods.py: privacy_mod acts)
DP_MODE = "dp-mode"  # "local" | "distributed": the client clips and noises its own update
DP_CLIP_NORM = "dp-clip-norm"  # C: the update is clipped to this L2 norm
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # sigma: local adds N(0, sigma^2 C^2)
DP_NOISE_SHARES = "dp-noise-shares"  # distributed: n, each client adds N(0, sigma^2 C^2 / n)
DP_DELTA = "dp-delta"
DP_MAX_EPSILON = "dp-max-epsilon"  # local: the client's ledger must stay within it (0 = none)
CLIENT_DP_MODES = ("local", "distributed")

# a site's own privacy floor, in its node config (--node-config): a request below it is declined
NODE_MIN_NOISE_MULTIPLIER = "dp-min-noise-multiplier"
NODE_MAX_EPSILON = "dp-max-epsilon"
NODE_DELTA = "dp-delta"
