"""Run config -> one typed, validated settings object.

Each run-config key is declared once (type, default, help, check), as a
field of its concern's settings group, one file per concern:
``config/model.py`` (model, base weights, LoRA, tiers), ``data.py``,
``federation.py``, ``training.py``, ``privacy.py``, ``constraints.py``,
``compression.py``, ``secagg.py``, ``run.py`` (``text.py``: the ``k=v`` text form). ``Settings``
(``settings.py``) joins the groups, and ``SPEC`` (the key table the pyproject
check reads) is derived from their fields. A field is ``key(default, help,
check)`` and its annotation is the key's type; the rules over one group's
keys are its ``_check_<concern>`` methods, beside them, and a group never
reads another's keys: what spans groups (the tier plan, the client
objective, the pairings a run may not use) is on ``Settings``, where a type
checker sees every key. ``Settings.from_run_config`` rejects unknown keys
(with "did you mean"), ill-typed values and out-of-range values with an
error naming the key, then the groups' rules and the pairings, so an
invalid run fails in the ServerApp before any client is contacted. No other
module reads the run config or the environment.

Layering: this package imports only leaves of the library (``fedmm.protocol``,
``fedmm.compression``'s codec specs, ``fedmm.faults``, ``fedmm.asynchrony``'s staleness parser, and ``fedmm.model``'s
registry for the model-name check); nothing above it.
"""

from .declare import ConfigError
from .data import PARTITIONERS
from .privacy import DP_MODES
from .settings import SPEC, Key, Settings
from .tiers import PROFILE_KEYS, Profile, RankPlan, parse_profiles
from .training import LOCAL_OPTIMIZERS, LOSSES

__all__ = [
    "ConfigError", "DP_MODES", "Key", "LOCAL_OPTIMIZERS", "LOSSES", "PARTITIONERS", "PROFILE_KEYS", "Profile",
    "RankPlan", "SPEC", "Settings", "parse_profiles",
]
