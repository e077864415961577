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
