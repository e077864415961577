"""Client tiers and the rank plan: which client trains which LoRA rank, layers, batch, steps.

``lora-rank``, ``lora-ranks``, ``client-profiles`` and ``partition-profiles``
are parsed once, into a ``RankPlan`` both sides use: the server for the
global adapter's rank, a client for its own ``Profile``. A reply says its rank
on the wire (``fedmm.protocol.LORA_RANK``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """One client tier (``client-profiles``): what this client trains, how much, and how reliably."""

    name: str
    lora_rank: int
    lora_targets: tuple[str, ...]
    batch_size: int
    local_steps: int
    time_budget: float  # seconds of local training per round; 0 = no budget
    precision: str  # fp32 | bf16 (autocast)
    dropout: float  # probability of missing a round
    delay: float = 0.0  # seconds a training reply is held back: a slower device, real in wall time


def _number(v: str, ok: Callable[[float], bool], problem: str) -> str | None:
    try:
        return None if ok(float(v)) else problem
    except ValueError:
        return problem


PROFILE_KEYS: dict[str, Callable[[str], str | None]] = {
    "lora-rank": lambda v: None if v.isdigit() and int(v) > 0 else "must be a positive integer",
    "lora-targets": lambda v: None if v.strip(",") else "must name at least one module",
    "batch-size": lambda v: None if v.isdigit() and int(v) > 0 else "must be a positive integer",
    "local-steps": lambda v: None if v.isdigit() and int(v) > 0 else "must be a positive integer",
    "time-budget": lambda v: _number(v, lambda x: x >= 0, "must be a number >= 0"),
    "precision": lambda v: None if v in ("fp32", "bf16") else "must be fp32 or bf16",
    "dropout": lambda v: _number(v, lambda x: 0 <= x < 1, "must be a number in [0, 1)"),
    "delay": lambda v: _number(v, lambda x: 0 <= x <= 86400, "must be a number of seconds in [0, 86400]"),
}


def parse_profiles(text: str) -> dict[str, dict[str, str]]:
    """``"phone: lora-rank=2 dropout=0.2; server: lora-rank=8"`` -> {name: {key: value}}, checked."""
    profiles: dict[str, dict[str, str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"profile {part!r}: expected 'name: key=value ...'")
        if name in profiles:
            raise ValueError(f"profile '{name}' is defined twice")
        spec = {}
        for pair in body.split():
            key, eq, value = pair.partition("=")
            if not eq or key not in PROFILE_KEYS:
                raise ValueError(f"profile '{name}': unknown setting {pair!r}; known: {', '.join(PROFILE_KEYS)}")
            problem = PROFILE_KEYS[key](value)
            if problem:
                raise ValueError(f"profile '{name}': {key} = {value!r} {problem}")
            spec[key] = value
        profiles[name] = spec
    return profiles


def parse_ranks(text: str) -> list[int]:
    """``"4,8,16"`` -> [4, 8, 16]; ValueError when any part is not a positive integer."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError("must be empty or comma-separated positive integers, e.g. \"4,8,16\"")
    return [int(p) for p in parts]


@dataclass(frozen=True)
class RankPlan:
    """The run's tiers, parsed once: each client's profile and the global adapter's rank."""

    lora_rank: int  # the run's rank (and the denominator of the one LoRA scale)
    client_ranks: tuple[int, ...]  # lora-ranks cycled over partitions, or (lora-rank,)
    profiles: Mapping[str, Mapping[str, str]]  # client-profiles: name -> settings
    cycle: tuple[str, ...]  # partition-profiles: profile names cycled over partitions
    lora_targets: tuple[str, ...]  # the run's adapted layers
    batch_size: int
    local_steps: int
    ranks_given: bool  # lora-ranks is set (profiles then must not set ranks too)

    @property
    def global_rank(self) -> int:
        """The global adapter's rank: the largest any client trains."""
        tiers = [int(spec["lora-rank"]) for spec in self.profiles.values() if "lora-rank" in spec]
        return max([*self.client_ranks, *tiers])

    @property
    def one_shape(self) -> bool:
        """Every client trains the run's one adapter shape (no lora-ranks, no profiles)."""
        return len(set(self.client_ranks)) == 1 and not self.profiles

    def rank_of(self, partition_id: int) -> int:
        """The LoRA rank ``lora-ranks`` gives a partition (profiles aside)."""
        return self.client_ranks[partition_id % len(self.client_ranks)]

    def profile_for(self, partition_id: int, node_profile: str | None = None) -> Profile:
        """The client's tier: its node config's ``profile``, else ``partition-profiles``, else the run's.

        ValueError when the node names a profile the run does not define.
        """
        name = node_profile or (self.cycle[partition_id % len(self.cycle)] if self.cycle else "")
        if name and name not in self.profiles:
            raise ValueError(f"node config 'profile' = '{name}': no such profile in 'client-profiles' "
                             f"({', '.join(self.profiles) or 'none defined'})")
        spec = self.profiles.get(name, {})
        targets = spec.get("lora-targets")
        return Profile(
            name=name or "default",
            lora_rank=int(spec.get("lora-rank", self.rank_of(partition_id))),
            lora_targets=tuple(targets.split(",")) if targets else self.lora_targets,
            batch_size=int(spec.get("batch-size", self.batch_size)),
            local_steps=int(spec.get("local-steps", self.local_steps)),
            time_budget=float(spec.get("time-budget", 0.0)),
            precision=str(spec.get("precision", "fp32")),
            dropout=float(spec.get("dropout", 0.0)),
            delay=float(spec.get("delay", 0.0)),
        )

    def problem(self) -> str | None:
        """What is inconsistent in the tiers (the run-config key first), or None."""
        unknown = sorted({name for name in self.cycle if name not in self.profiles})
        if unknown:
            return (f"'partition-profiles': unknown profile(s) {', '.join(unknown)}; "
                    f"'client-profiles' defines {', '.join(self.profiles) or 'none'}")
        if self.profiles and self.ranks_given:
            return "'lora-ranks' and 'client-profiles' both set client ranks; give each profile its 'lora-rank' instead"
        for name, spec in self.profiles.items():
            extra = [t for t in spec.get("lora-targets", "").split(",") if t and t not in self.lora_targets]
            if extra:
                return (f"'client-profiles': profile '{name}' targets {', '.join(extra)}, "
                        f"not among the run's lora-targets ({', '.join(self.lora_targets)})")
            for key, run_value in (("local-steps", self.local_steps), ("batch-size", self.batch_size)):
                if key in spec and int(spec[key]) > run_value:
                    return (f"'client-profiles': profile '{name}' sets {key}={spec[key]}, more than the run's "
                            f"'{key}' = {run_value}: a tier may only lower the work the server asks for")
        return None
