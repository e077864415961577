"""Run config -> one typed, validated settings object.

Every run-config key fedmm understands is declared once in ``SPEC`` (type,
default, check, help). ``Settings.from_run_config`` rejects unknown keys,
ill-typed values and out-of-range values with an error naming the key, so an
invalid run fails in the ServerApp before any client is contacted. The
defaults in pyproject's ``[tool.flwr.app.config]`` must equal ``SPEC``'s
(a test checks it). No other module reads the run config or the environment.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
DP_MODES = ("none", "dp-sgd", "central-server", "central-client", "local", "distributed")
LOSSES = ("auto", "clip", "unicl", "public-negatives")
LOCAL_OPTIMIZERS = ("adamw", "sgd")


class ConfigError(ValueError):
    """A run-config value is unknown, ill-typed or out of range."""


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns a message when invalid


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _fraction(v: Any) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _open_fraction(v: Any) -> str | None:
    return None if 0.0 < v < 1.0 else "must be in (0, 1)"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _parses(parse: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    """A check that passes when ``parse(value)`` does; its ValueError's message is the problem."""

    def check(v: Any) -> str | None:
        try:
            parse(v)
        except ValueError as exc:
            return str(exc)
        return None

    return check


def _codec(v: Any) -> str | None:
    from .compression import make_codec

    return _parses(make_codec)(v)


def _faults(v: Any) -> str | None:
    from .faults import parse_faults

    return _parses(parse_faults)(v)


def _constraint_list(v: Any) -> str | None:
    from .constraints import CONSTRAINTS

    bad = [p.strip() for p in v.split(",") if p.strip() and p.strip() not in CONSTRAINTS]
    return f"unknown constraint(s) {', '.join(bad)}; known: {', '.join(CONSTRAINTS)}" if bad else None


def _unit_interval(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _rank_list(v: Any) -> str | None:
    parts = [p.strip() for p in v.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        return "must be empty or comma-separated positive integers, e.g. \"4,8,16\""
    return None


SPEC: dict[str, Key] = {
    # model
    "model": Key(
        str, "effnet-lite0-minilm",
        "open_clip model name (bundled: effnet-lite0-minilm = pretrained EfficientNet-Lite0 + "
        "MiniLM towers; fedmm-tiny-vit = small CLIP trained from scratch, for fast tests)",
    ),
    "pretrained": Key(
        str,
        "public-pretrain",
        "base weights: 'public-pretrain' (central pretraining on the public split, "
        "cached), 'none' (random), a local checkpoint path, or an open_clip tag",
    ),
    "pretrain-steps": Key(int, 800, "optimizer steps of the central base pretraining", _positive),
    "pretrain-batch-size": Key(int, 64, "batch size of the central base pretraining", _positive),
    "pretrain-lr": Key(float, 1e-3, "learning rate of the central base pretraining", _positive),
    # LoRA
    "lora-rank": Key(int, 8, "LoRA rank r", _positive),
    "lora-alpha": Key(float, 16.0, "LoRA scaling alpha (scale = alpha / lora-rank, for every client)", _positive),
    "lora-ranks": Key(
        str, "",
        "per-client LoRA ranks, e.g. \"4,8,16\": partition p gets the (p mod n)-th; the global adapter "
        "has the largest; empty = every client has lora-rank",
        _rank_list,
    ),
    "lora-targets": Key(
        str,
        "auto",
        "comma-separated names of the nn.Linear / 1x1 nn.Conv2d layers that carry LoRA; "
        "'auto' = the model's attention and MLP layers (and 1x1 convs of a conv image tower)",
        lambda v: None if v.strip() else "must name at least one module",
    ),
    # heterogeneous clients (fedmm.config.Profile)
    "client-profiles": Key(
        str, "",
        "named client tiers, ';'-separated, each 'name: key=value ...' with keys lora-rank, lora-targets "
        "(a subset of the run's, comma-separated), batch-size, local-steps, time-budget (seconds of local "
        "training per round; 0 = none), precision (fp32 | bf16), dropout (probability of missing a round); "
        "unset keys take the run's values. E.g. \"phone: lora-rank=2 batch-size=8 time-budget=2 dropout=0.2; "
        "server: lora-rank=8\"",
        lambda v: _parses(parse_profiles)(v),
    ),
    "partition-profiles": Key(
        str, "",
        "simulation: profile names cycled over partitions (partition p gets the (p mod n)-th), e.g. "
        "\"phone,phone,server\"; a SuperNode's node config 'profile' takes precedence",
    ),
    # data
    "dataset": Key(str, "digits", "'digits' (bundled) or a path to a CSV/JSONL manifest"),
    "partitioner": Key(str, "dirichlet", "how client data is split", _one_of(*PARTITIONERS)),
    "dirichlet-alpha": Key(float, 0.3, "Dirichlet concentration (smaller = more label skew)", _positive),
    "classes-per-client": Key(int, 2, "classes per client for the pathological partitioner", _positive),
    "test-fraction": Key(float, 0.2, "per-client held-out fraction", _open_fraction),
    "group-sites": Key(
        float, 0.3,
        "fraction of clients holding the minority group(s) of the 'group' column (the others hold only the "
        "majority group); 1 = every group spread like the labels",
        _fraction,
    ),
    # federation
    "num-server-rounds": Key(int, 10, "federated rounds", _positive),
    "strategy": Key(str, "fedavg", "aggregation strategy name (`fedmm strategies` lists them)"),
    "strategy-args": Key(
        str, "", "the strategy's own constructor arguments, e.g. \"eta=0.01 beta_1=0.9\" (Flower k=v syntax)"
    ),
    "fraction-train": Key(float, 1.0, "fraction of nodes sampled for training", _fraction),
    "fraction-evaluate": Key(float, 1.0, "fraction of nodes sampled for federated evaluation", _fraction),
    "min-nodes": Key(int, 2, "minimum nodes per round (train and evaluate)", _positive),
    "round-timeout": Key(float, 600.0, "seconds to wait for replies in a round", _positive),
    # update validation (strategies/validation.py)
    "max-update-norm-ratio": Key(float, 10.0, "drop updates whose norm exceeds this x the round's median (0 = off)",
                                 _non_negative),
    "update-norm-bound": Key(float, 0.0, "clip every update to this L2 norm before aggregation (0 = off)",
                             _non_negative),
    "inject-faults": Key(str, "", "tests and benchmarks: misbehaving clients, e.g. \"crash=0.1,scale=0.2\" "
                                  "(kinds: crash, timeout, nan, signflip, scale, noise)", _faults),
    # local training
    "local-steps": Key(int, 12, "optimizer steps per client per round", _positive),
    "batch-size": Key(int, 32, "client batch size", _positive),
    "lr": Key(float, 3e-3, "client learning rate (the local optimizer's step size on adapter parameters)", _positive),
    "local-optimizer": Key(
        str, "adamw",
        "clients' optimizer: 'adamw', or 'sgd' (plain SGD at lr; what QFedAvg's Lipschitz estimate 1/lr assumes)",
        _one_of(*LOCAL_OPTIMIZERS),
    ),
    "weight-decay": Key(float, 0.0, "client weight decay (decoupled under adamw, L2 under sgd)", _non_negative),
    "proximal-mu": Key(float, 0.0, "FedProx mu: adds mu/2 * ||w - w_global||^2", _non_negative),
    "loss": Key(
        str, "auto",
        "client objective: 'clip' (open_clip ClipLoss, in-batch negatives), 'unicl' (ClipLoss with every "
        "in-batch pair of the same class as a positive; for label-skewed clients), 'public-negatives' (per-sample "
        "InfoNCE against public pairs embedded each step; what DP-SGD needs), 'auto' = public-negatives under "
        "dp-sgd, else clip",
        _one_of(*LOSSES),
    ),
    "public-captions": Key(
        int, 0,
        "captions of public pairs added, with gradient, to every step of the 'unicl' loss, so a client that "
        "holds one class still contrasts it with the others (0 = in-batch only)",
        _non_negative,
    ),
    # differential privacy (fedmm.privacy, strategies/privacy.py, clients/mods.py)
    "dp": Key(
        str, "none",
        "differential privacy: none | dp-sgd (sample level, Opacus) | central-server | central-client | "
        "local | distributed (client level)",
        _one_of(*DP_MODES),
    ),
    "dp-noise-multiplier": Key(
        float, 1.0, "Gaussian noise std / clipping norm (per step for dp-sgd, per round for client level)", _non_negative
    ),
    "dp-clip-norm": Key(
        float, 1.0, "L2 clipping norm: of each per-sample gradient (dp-sgd) or of each client's update", _positive
    ),
    "dp-delta": Key(float, 1e-5, "target delta of the (epsilon, delta) guarantee", _open_fraction),
    "max-epsilon": Key(
        float, 0.0,
        "privacy budget: a client (dp-sgd, local) stops training, or the run stops (central, distributed), "
        "before epsilon would exceed it; 0 = no budget",
        _non_negative,
    ),
    "dp-negatives": Key(int, 64, "public pairs drawn as negatives at each step of the 'public-negatives' loss", _positive),
    "dp-grad-sample-mode": Key(
        str, "hooks", "Opacus per-sample gradients for dp-sgd: hooks | ghost (ghost clipping)", _one_of("hooks", "ghost")
    ),
    # fairness and toxicity constraints (fedmm.constraints, strategies/constraints.py)
    "constraints": Key(
        str, "",
        "constraints training must honour, comma-separated: group-gap (zero-shot accuracy gap between groups "
        "<= max-group-gap), toxicity (toxic top-1 retrieval rate <= max-toxic-rate); empty = none (still measured)",
        _constraint_list,
    ),
    "max-group-gap": Key(float, 0.05, "threshold of the group-gap constraint", _unit_interval),
    "max-toxic-rate": Key(float, 0.01, "threshold of the toxicity constraint", _unit_interval),
    "dual-step-group-gap": Key(float, 5.0, "dual ascent step of the group-gap multiplier (lambda)", _positive),
    "dual-step-toxicity": Key(float, 5.0, "dual ascent step of the toxicity multiplier (mu)", _positive),
    # compression (fedmm.compression)
    "codec": Key(str, "fp32", "uplink codec: [topk<f>+](fp32|fp16|bf16|q8|q4|q2)[-row]", _codec),
    "codec-downlink": Key(str, "fp32", "downlink codec for the global adapter (dense only)", _codec),
    "error-feedback": Key(bool, True, "clients carry the compression error into their next update"),
    # run
    "seed": Key(int, 0, "seed of everything random in the run", _non_negative),
    "output-dir": Key(str, "", "report folder; empty = ~/fedmm-runs/<timestamp>"),
    "resume": Key(bool, False, "continue the run in output-dir after its last completed round (its checkpoint); "
                               "the run config must be the checkpoint's, num-server-rounds and round-timeout aside"),
    "cache-dir": Key(str, "", "base-checkpoint cache; empty = $XDG_CACHE_HOME/fedmm or ~/.cache/fedmm"),
}


def _attr(key: str) -> str:
    return key.replace("-", "_")


@dataclass(frozen=True)
class Settings:
    """Validated run settings; attribute names are the run-config keys in snake_case."""

    model: str
    pretrained: str
    pretrain_steps: int
    pretrain_batch_size: int
    pretrain_lr: float
    lora_rank: int
    lora_alpha: float
    lora_ranks: str
    lora_targets: str
    client_profiles: str
    partition_profiles: str
    dataset: str
    partitioner: str
    dirichlet_alpha: float
    classes_per_client: int
    test_fraction: float
    group_sites: float
    num_server_rounds: int
    strategy: str
    strategy_args: str
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    round_timeout: float
    max_update_norm_ratio: float
    update_norm_bound: float
    inject_faults: str
    local_steps: int
    batch_size: int
    lr: float
    local_optimizer: str
    weight_decay: float
    proximal_mu: float
    loss: str
    public_captions: int
    dp: str
    dp_noise_multiplier: float
    dp_clip_norm: float
    dp_delta: float
    max_epsilon: float
    dp_negatives: int
    dp_grad_sample_mode: str
    constraints: str
    max_group_gap: float
    max_toxic_rate: float
    dual_step_group_gap: float
    dual_step_toxicity: float
    codec: str
    codec_downlink: str
    error_feedback: bool
    seed: int
    output_dir: str
    resume: bool
    cache_dir: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None) -> Settings:
        """Validate a flat run config (missing keys take their defaults)."""
        run_config = dict(run_config or {})
        unknown = sorted(set(run_config) - set(SPEC))
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, SPEC, n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(
                f"unknown run-config key(s): {', '.join(hints)}; known keys: {', '.join(SPEC)}"
            )
        values: dict[str, Any] = {}
        for key, spec in SPEC.items():
            value = _coerce(key, spec, run_config.get(key, spec.default))
            if spec.check is not None:
                problem = spec.check(value)
                if problem:
                    raise ConfigError(f"run-config '{key}' = {value!r}: {problem}")
            values[_attr(key)] = value
        settings = cls(**values)
        settings._check_cross_field()
        return settings

    @property
    def fault_fractions(self) -> dict[str, float]:
        from .faults import parse_faults

        return parse_faults(self.inject_faults)

    def _check_cross_field(self) -> None:
        from .model import available_models  # open_clip's registry, plus fedmm's bundled configs

        if self.model not in available_models():
            close = difflib.get_close_matches(self.model, available_models(), n=3)
            raise ConfigError(
                f"run-config 'model': unknown open_clip model '{self.model}'"
                + (f" (did you mean {', '.join(close)}?)" if close else "; e.g. effnet-lite0-minilm, fedmm-tiny-vit, ViT-B-32")
            )
        if not self.lora_target_list:
            raise ConfigError("run-config 'lora-targets' must name at least one module")
        if self.pretrained not in ("public-pretrain", "none") and _looks_like_path(self.pretrained):
            if not Path(self.pretrained).expanduser().is_file():
                raise ConfigError(
                    f"run-config 'pretrained': checkpoint file not found: {self.pretrained}"
                )
        if "topk" in self.codec_downlink:
            raise ConfigError(
                "run-config 'codec-downlink': top-k would drop most of the global adapter; "
                "use a dense codec (fp16, bf16, q8, ...)"
            )
        if self.dp == "dp-sgd" and self.loss in ("clip", "unicl"):
            raise ConfigError(
                f"run-config 'loss' = '{self.loss}' with 'dp' = 'dp-sgd': this loss uses the other pairs of a batch "
                "as negatives, so one example's gradient depends on the others and DP-SGD's per-sample guarantee "
                "does not hold; use loss = 'public-negatives' (or 'auto')"
            )
        if self.dp != "none" and self.dp_noise_multiplier <= 0:
            raise ConfigError(
                f"run-config 'dp-noise-multiplier' = {self.dp_noise_multiplier}: must be > 0 with dp = '{self.dp}' "
                "(without noise there is no guarantee; use dp = 'none')"
            )
        if self.constraint_list and self.dp == "dp-sgd":
            raise ConfigError(
                "run-config 'constraints' with 'dp' = 'dp-sgd': the constraint surrogates compare the examples of a "
                "batch (group means, in-batch retrieval), so one example's gradient depends on the others and "
                "DP-SGD's per-sample guarantee would not hold; use client-level DP (dp = central-server, ...)"
            )
        self._check_dp_codec()
        if self.max_epsilon > 0 and self.dp == "none":
            raise ConfigError("run-config 'max-epsilon' is set but 'dp' = 'none': there is no epsilon to budget")
        self._check_profiles()
        if self.resume and not self.output_dir:
            raise ConfigError("run-config 'resume' = true needs 'output-dir': the folder of the run to continue")
        if self.resume and self.dp in ("dp-sgd", "local"):
            raise ConfigError(
                f"run-config 'resume' with 'dp' = '{self.dp}': each client's privacy ledger lives in its ClientApp's "
                "state, which a new run starts empty, so clients could spend their budget twice; start a new run"
            )
        if self.dataset != "digits" and not Path(self.dataset).expanduser().is_file():
            raise ConfigError(f"run-config 'dataset': manifest file not found: {self.dataset}")

    def _check_dp_codec(self) -> None:
        """Refuse the (dp, codec) pairs whose guarantee would not hold (fedmm/privacy/update.py has the argument)."""
        from .compression import make_codec

        if make_codec(self.codec).lossless:
            return
        if self.dp == "central-client":
            raise ConfigError(
                f"run-config 'codec' = '{self.codec}' with 'dp' = 'central-client': the server adds noise calibrated "
                "to the clipping norm to the update it decodes, Q(clipped update + error-feedback residual), and a "
                "lossy codec does not keep that within the norm (q2 alone nearly doubles it), so the reported "
                "epsilon would not hold; use dp = 'central-server' (it clips what it decodes) or codec = 'fp32'"
            )
        if self.dp == "distributed":
            raise ConfigError(
                f"run-config 'codec' = '{self.codec}' with 'dp' = 'distributed': each client's noise share would be "
                "encoded on its own by a lossy codec whose error is not bounded by the clipping norm, so the sum is "
                "not the Gaussian mechanism the accountant charges (an integer mechanism under secure aggregation "
                "is what makes this valid); use codec = 'fp32', or dp = 'central-server' or 'local'"
            )

    def _check_profiles(self) -> None:
        profiles = parse_profiles(self.client_profiles)
        cycle = self.partition_profile_list
        unknown = sorted({name for name in cycle if name not in profiles})
        if unknown:
            raise ConfigError(f"run-config 'partition-profiles': unknown profile(s) {', '.join(unknown)}; "
                              f"'client-profiles' defines {', '.join(profiles) or 'none'}")
        if profiles and self.lora_ranks.strip():
            raise ConfigError("run-config 'lora-ranks' and 'client-profiles' both set client ranks; "
                              "give each profile its 'lora-rank' instead")
        for name, spec in profiles.items():
            extra = [t for t in spec.get("lora-targets", "").split(",") if t and t not in self.lora_target_list]
            if extra:
                raise ConfigError(f"run-config 'client-profiles': profile '{name}' targets {', '.join(extra)}, "
                                  f"not among the run's lora-targets ({', '.join(self.lora_target_list)})")
            if float(spec.get("time-budget", 0)) > 0 and self.dp == "dp-sgd":
                raise ConfigError(f"run-config 'client-profiles': profile '{name}' has a time-budget, which "
                                  "dp = 'dp-sgd' cannot honour (its ledger is charged for the planned steps)")
            if spec.get("precision") == "bf16" and self.dp == "dp-sgd":
                raise ConfigError(f"run-config 'client-profiles': profile '{name}' trains in bf16, which "
                                  "dp = 'dp-sgd' (Opacus per-sample gradients in fp32) does not support")

    @property
    def partition_profile_list(self) -> list[str]:
        return [p.strip() for p in self.partition_profiles.split(",") if p.strip()]

    def profile_for(self, partition_id: int, node_profile: str | None = None) -> Profile:
        """The client's tier: the SuperNode's ``profile`` node config, else ``partition-profiles``, else the run's."""
        profiles = parse_profiles(self.client_profiles)
        cycle = self.partition_profile_list
        name = node_profile or (cycle[partition_id % len(cycle)] if cycle else "")
        if name and name not in profiles:
            raise ConfigError(f"node config 'profile' = '{name}': no such profile in 'client-profiles' "
                              f"({', '.join(profiles) or 'none defined'})")
        spec = profiles.get(name, {})
        targets = spec.get("lora-targets")
        return Profile(
            name=name or "default",
            lora_rank=int(spec.get("lora-rank", self.rank_of(partition_id))),
            lora_targets=tuple(targets.split(",")) if targets else tuple(self.lora_target_list),
            batch_size=int(spec.get("batch-size", self.batch_size)),
            local_steps=int(spec.get("local-steps", self.local_steps)),
            time_budget=float(spec.get("time-budget", 0.0)),
            precision=str(spec.get("precision", "fp32")),
            dropout=float(spec.get("dropout", 0.0)),
        )

    def to_run_config(self) -> dict[str, Any]:
        """The flat run-config form (round-trips through ``from_run_config``)."""
        return {key: getattr(self, _attr(key)) for key in SPEC}

    @property
    def objective(self) -> str:
        """The client loss actually used: 'clip', 'unicl' or 'public-negatives'."""
        if self.loss == "auto":
            return "public-negatives" if self.dp == "dp-sgd" else "clip"
        return self.loss

    @property
    def public_draw(self) -> int:
        """Public pairs the client objective draws at each step (0: it uses no public data)."""
        return {"unicl": self.public_captions, "public-negatives": self.dp_negatives}.get(self.objective, 0)

    @property
    def constraint_list(self) -> list[str]:
        return list(dict.fromkeys(p.strip() for p in self.constraints.split(",") if p.strip()))

    @property
    def client_ranks(self) -> list[int]:
        return [int(p) for p in self.lora_ranks.split(",") if p.strip()] or [self.lora_rank]

    def rank_of(self, partition_id: int) -> int:
        """The LoRA rank of a client (by partition id)."""
        ranks = self.client_ranks
        return ranks[partition_id % len(ranks)]

    @property
    def global_rank(self) -> int:
        """The global adapter's rank: the largest any client trains."""
        ranks = [int(f["lora-rank"]) for f in parse_profiles(self.client_profiles).values() if "lora-rank" in f]
        return max(self.client_ranks + ranks)

    def lora_alpha_for(self, rank: int) -> float:
        """peft alpha giving rank ``rank`` the run's one scale, lora-alpha / lora-rank."""
        return self.lora_alpha * rank / self.lora_rank

    @property
    def lora_target_list(self) -> list[str]:
        if self.lora_targets.strip() == "auto":
            from .model import default_lora_targets

            return default_lora_targets(self.model)
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "fedmm"


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


PROFILE_KEYS: dict[str, Callable[[str], str | None]] = {
    "lora-rank": lambda v: None if v.isdigit() and int(v) > 0 else "must be a positive integer",
    "lora-targets": lambda v: None if v.strip(",") else "must name at least one module",
    "batch-size": lambda v: None if v.isdigit() and int(v) > 0 else "must be a positive integer",
    "local-steps": lambda v: None if v.isdigit() and int(v) > 0 else "must be a positive integer",
    "time-budget": lambda v: _number(v, lambda x: x >= 0, "must be a number >= 0"),
    "precision": lambda v: None if v in ("fp32", "bf16") else "must be fp32 or bf16",
    "dropout": lambda v: _number(v, lambda x: 0 <= x < 1, "must be a number in [0, 1)"),
}


def _number(v: str, ok: Callable[[float], bool], problem: str) -> str | None:
    try:
        return None if ok(float(v)) else problem
    except ValueError:
        return problem


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


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _coerce(key: str, spec: Key, value: Any) -> Any:
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if spec.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, spec.type) or (spec.type is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"run-config '{key}' = {value!r}: expected {spec.type.__name__}, got {type(value).__name__}"
        )
    return value


assert [f.name for f in fields(Settings)] == [_attr(k) for k in SPEC], "Settings and SPEC disagree"
