"""The run's settings, one group per concern; each key declared once, each group's rules beside it.

Every field is one run-config key (``key(default, help, check)``); its type
is the annotation. A group's ``_check_<concern>`` holds the rules that
involve its keys (with the other groups' where a rule spans two concerns,
under the concern that imposes it). ``fedmm.config.Settings`` joins them.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import protocol
from ..compression import make_codec
from ..faults import parse_faults
from .declare import (
    ConfigError,
    fraction,
    key,
    non_negative,
    one_of,
    open_fraction,
    parses,
    positive,
    unit_interval,
)
from .tiers import Profile, RankPlan, parse_profiles, parse_ranks

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
DP_MODES = ("none", "dp-sgd", "central-server", "central-client", "local", "distributed")
LOSSES = ("auto", "clip", "unicl", "public-negatives")
LOCAL_OPTIMIZERS = ("adamw", "sgd")
BASE_SOURCES = ("public-pretrain", "none")  # besides a local checkpoint path or an open_clip tag


def _constraint_list(v: Any) -> str | None:
    bad = [p.strip() for p in v.split(",") if p.strip() and p.strip() not in protocol.CONSTRAINTS]
    return f"unknown constraint(s) {', '.join(bad)}; known: {', '.join(protocol.CONSTRAINTS)}" if bad else None


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


@dataclass(frozen=True)
class ModelSettings:
    """The model, its base weights, LoRA, and the client tiers (fedmm.model, fedmm.lora, config.tiers)."""

    model: str = key(
        "effnet-lite0-minilm",
        "open_clip model name (bundled: effnet-lite0-minilm = pretrained EfficientNet-Lite0 + "
        "MiniLM towers; fedmm-tiny-vit = small CLIP trained from scratch, for fast tests)",
    )
    pretrained: str = key(
        "public-pretrain",
        "base weights: 'public-pretrain' (central pretraining on the public split, "
        "cached), 'none' (random), a local checkpoint path, or an open_clip tag",
    )
    pretrain_steps: int = key(800, "optimizer steps of the central base pretraining", positive)
    pretrain_batch_size: int = key(64, "batch size of the central base pretraining", positive)
    pretrain_lr: float = key(1e-3, "learning rate of the central base pretraining", positive)
    lora_rank: int = key(8, "LoRA rank r", positive)
    lora_alpha: float = key(16.0, "LoRA scaling alpha (scale = alpha / lora-rank, for every client)", positive)
    lora_ranks: str = key(
        "",
        "per-client LoRA ranks, e.g. \"4,8,16\": partition p gets the (p mod n)-th; the global adapter "
        "has the largest; empty = every client has lora-rank",
        parses(parse_ranks),
    )
    lora_targets: str = key(
        "auto",
        "comma-separated names of the nn.Linear / 1x1 nn.Conv2d layers that carry LoRA; "
        "'auto' = the model's attention and MLP layers (and 1x1 convs of a conv image tower)",
        lambda v: None if v.strip() else "must name at least one module",
    )
    client_profiles: str = key(
        "",
        "named client tiers, ';'-separated, each 'name: key=value ...' with keys lora-rank, lora-targets "
        "(a subset of the run's, comma-separated), batch-size, local-steps, time-budget (seconds of local "
        "training per round; 0 = none), precision (fp32 | bf16), dropout (probability of missing a round); "
        "unset keys take the run's values. E.g. \"phone: lora-rank=2 batch-size=8 time-budget=2 dropout=0.2; "
        "server: lora-rank=8\"",
        parses(parse_profiles),
    )
    partition_profiles: str = key(
        "",
        "simulation: profile names cycled over partitions (partition p gets the (p mod n)-th), e.g. "
        "\"phone,phone,server\"; a SuperNode's node config 'profile' takes precedence",
    )

    def _check_model(self) -> None:
        from ..model import available_models  # open_clip's registry, plus fedmm's bundled configs

        if self.model not in available_models():
            close = difflib.get_close_matches(self.model, available_models(), n=3)
            raise ConfigError(
                f"run-config 'model': unknown open_clip model '{self.model}'"
                + (f" (did you mean {', '.join(close)}?)" if close else "; e.g. effnet-lite0-minilm, fedmm-tiny-vit, ViT-B-32")
            )
        if not self.lora_target_list:
            raise ConfigError("run-config 'lora-targets' must name at least one module")
        if self.pretrained not in BASE_SOURCES and _looks_like_path(self.pretrained):
            if not Path(self.pretrained).expanduser().is_file():
                raise ConfigError(f"run-config 'pretrained': checkpoint file not found: {self.pretrained}")

    def _check_tiers(self) -> None:
        problem = self.rank_plan.problem()
        if problem:
            raise ConfigError(f"run-config {problem}")

    @property
    def lora_target_list(self) -> list[str]:
        if self.lora_targets.strip() == "auto":
            from ..model import default_lora_targets

            return default_lora_targets(self.model)
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def lora_alpha_for(self, rank: int) -> float:
        """peft alpha giving rank ``rank`` the run's one scale, lora-alpha / lora-rank."""
        return self.lora_alpha * rank / self.lora_rank

    @cached_property
    def rank_plan(self) -> RankPlan:
        """The tiers, parsed once (config.tiers)."""
        ranks = parse_ranks(self.lora_ranks)
        return RankPlan(
            lora_rank=self.lora_rank,
            client_ranks=tuple(ranks or [self.lora_rank]),
            profiles=parse_profiles(self.client_profiles),
            cycle=tuple(self.partition_profile_list),
            lora_targets=tuple(self.lora_target_list),
            batch_size=self.batch_size,  # type: ignore[attr-defined]  # TrainingSettings
            local_steps=self.local_steps,  # type: ignore[attr-defined]
            ranks_given=bool(ranks),
        )

    @property
    def partition_profile_list(self) -> list[str]:
        return [p.strip() for p in self.partition_profiles.split(",") if p.strip()]

    # the plan's answers, by name
    @property
    def client_ranks(self) -> list[int]:
        return list(self.rank_plan.client_ranks)

    def rank_of(self, partition_id: int) -> int:
        return self.rank_plan.rank_of(partition_id)

    @property
    def global_rank(self) -> int:
        return self.rank_plan.global_rank

    def profile_for(self, partition_id: int, node_profile: str | None = None) -> Profile:
        try:
            return self.rank_plan.profile_for(partition_id, node_profile)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


@dataclass(frozen=True)
class DataSettings:
    """The dataset and how it is split over clients (fedmm.data)."""

    dataset: str = key("digits", "'digits' (bundled) or a path to a CSV/JSONL manifest")
    partitioner: str = key("dirichlet", "how client data is split", one_of(*PARTITIONERS))
    dirichlet_alpha: float = key(0.3, "Dirichlet concentration (smaller = more label skew)", positive)
    classes_per_client: int = key(2, "classes per client for the pathological partitioner", positive)
    test_fraction: float = key(0.2, "per-client held-out fraction", open_fraction)
    group_sites: float = key(
        0.3,
        "fraction of clients holding the minority group(s) of the 'group' column (the others hold only the "
        "majority group); 1 = every group spread like the labels",
        fraction,
    )

    def _check_data(self) -> None:
        if self.dataset != "digits" and not Path(self.dataset).expanduser().is_file():
            raise ConfigError(f"run-config 'dataset': manifest file not found: {self.dataset}")


@dataclass(frozen=True)
class FederationSettings:
    """Rounds, the strategy, sampling, and what the server does with updates it distrusts (strategies/)."""

    num_server_rounds: int = key(10, "federated rounds", positive)
    strategy: str = key("fedavg", "aggregation strategy name (`fedmm strategies` lists them)")
    strategy_args: str = key(
        "", "the strategy's own constructor arguments, e.g. \"eta=0.01 beta_1=0.9\" (Flower k=v syntax)"
    )
    fraction_train: float = key(1.0, "fraction of nodes sampled for training", fraction)
    fraction_evaluate: float = key(1.0, "fraction of nodes sampled for federated evaluation", fraction)
    min_nodes: int = key(2, "minimum nodes per round (train and evaluate)", positive)
    round_timeout: float = key(600.0, "seconds to wait for replies in a round", positive)
    max_update_norm_ratio: float = key(
        10.0, "drop updates whose norm exceeds this x the round's median (0 = off)", non_negative)
    update_norm_bound: float = key(
        0.0, "clip every update to this L2 norm before aggregation (0 = off)", non_negative)
    inject_faults: str = key(
        "", "tests and benchmarks: misbehaving clients, e.g. \"crash=0.1,scale=0.2\" "
            "(kinds: crash, timeout, nan, signflip, scale, noise)", parses(parse_faults))

    def sampled_per_round(self, num_nodes: int) -> int:
        """Nodes per training round, as Flower's FedAvg samples them."""
        return max(int(num_nodes * self.fraction_train), self.min_nodes)

    @property
    def fault_fractions(self) -> dict[str, float]:
        return parse_faults(self.inject_faults)


@dataclass(frozen=True)
class TrainingSettings:
    """Local training and the client objective (fedmm.train, fedmm.losses)."""

    local_steps: int = key(12, "optimizer steps per client per round", positive)
    batch_size: int = key(32, "client batch size", positive)
    lr: float = key(3e-3, "client learning rate (the local optimizer's step size on adapter parameters)", positive)
    local_optimizer: str = key(
        "adamw",
        "clients' optimizer: 'adamw', or 'sgd' (plain SGD at lr; what QFedAvg's Lipschitz estimate 1/lr assumes)",
        one_of(*LOCAL_OPTIMIZERS),
    )
    weight_decay: float = key(0.0, "client weight decay (decoupled under adamw, L2 under sgd)", non_negative)
    proximal_mu: float = key(0.0, "FedProx mu: adds mu/2 * ||w - w_global||^2", non_negative)
    loss: str = key(
        "auto",
        "client objective: 'clip' (open_clip ClipLoss, in-batch negatives), 'unicl' (ClipLoss with every "
        "in-batch pair of the same class as a positive; for label-skewed clients), 'public-negatives' (per-sample "
        "InfoNCE against public pairs embedded each step; what DP-SGD needs), 'auto' = public-negatives under "
        "dp-sgd, else clip",
        one_of(*LOSSES),
    )
    public_captions: int = key(
        0,
        "captions of public pairs added, with gradient, to every step of the 'unicl' loss, so a client that "
        "holds one class still contrasts it with the others (0 = in-batch only)",
        non_negative,
    )

    @property
    def objective(self) -> str:
        """The client loss actually used: 'clip', 'unicl' or 'public-negatives'."""
        if self.loss == "auto":
            return "public-negatives" if self.dp == "dp-sgd" else "clip"  # type: ignore[attr-defined]
        return self.loss

    @property
    def public_draw(self) -> int:
        """Public pairs the client objective draws at each step (0: it uses no public data)."""
        draws = {"unicl": self.public_captions, "public-negatives": self.dp_negatives}  # type: ignore[attr-defined]
        return draws.get(self.objective, 0)


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy (fedmm.privacy); its rules refuse every pairing whose guarantee would not hold."""

    dp: str = key(
        "none",
        "differential privacy: none | dp-sgd (sample level, Opacus) | central-server | central-client | "
        "local | distributed (client level)",
        one_of(*DP_MODES),
    )
    dp_noise_multiplier: float = key(
        1.0, "Gaussian noise std / clipping norm (per step for dp-sgd, per round for client level)", non_negative)
    dp_clip_norm: float = key(
        1.0, "L2 clipping norm: of each per-sample gradient (dp-sgd) or of each client's update", positive)
    dp_delta: float = key(1e-5, "target delta of the (epsilon, delta) guarantee", open_fraction)
    max_epsilon: float = key(
        0.0,
        "privacy budget: a client (dp-sgd, local) stops training, or the run stops (central, distributed), "
        "before epsilon would exceed it; 0 = no budget",
        non_negative,
    )
    dp_negatives: int = key(
        64, "public pairs drawn as negatives at each step of the 'public-negatives' loss", positive)
    dp_grad_sample_mode: str = key(
        "hooks", "Opacus per-sample gradients for dp-sgd: hooks | ghost (ghost clipping)", one_of("hooks", "ghost"))

    def _check_privacy(self) -> None:
        s: Any = self  # the joined Settings: this group's rules read the keys of the others
        if self.dp == "dp-sgd" and s.loss in ("clip", "unicl"):
            raise ConfigError(
                f"run-config 'loss' = '{s.loss}' with 'dp' = 'dp-sgd': this loss uses the other pairs of a batch "
                "as negatives, so one example's gradient depends on the others and DP-SGD's per-sample guarantee "
                "does not hold; use loss = 'public-negatives' (or 'auto')"
            )
        if self.dp != "none" and self.dp_noise_multiplier <= 0:
            raise ConfigError(
                f"run-config 'dp-noise-multiplier' = {self.dp_noise_multiplier}: must be > 0 with dp = '{self.dp}' "
                "(without noise there is no guarantee; use dp = 'none')"
            )
        if s.constraint_list and self.dp == "dp-sgd":
            raise ConfigError(
                "run-config 'constraints' with 'dp' = 'dp-sgd': the constraint surrogates compare the examples of a "
                "batch (group means, in-batch retrieval), so one example's gradient depends on the others and "
                "DP-SGD's per-sample guarantee would not hold; use client-level DP (dp = central-server, ...)"
            )
        self._check_dp_codec()
        if self.max_epsilon > 0 and self.dp == "none":
            raise ConfigError("run-config 'max-epsilon' is set but 'dp' = 'none': there is no epsilon to budget")
        if self.dp == "dp-sgd":
            for name, spec in s.rank_plan.profiles.items():
                if float(spec.get("time-budget", 0)) > 0:
                    raise ConfigError(f"run-config 'client-profiles': profile '{name}' has a time-budget, which "
                                      "dp = 'dp-sgd' cannot honour (its ledger is charged for the planned steps)")
                if spec.get("precision") == "bf16":
                    raise ConfigError(f"run-config 'client-profiles': profile '{name}' trains in bf16, which "
                                      "dp = 'dp-sgd' (Opacus per-sample gradients in fp32) does not support")
        if s.resume and self.dp in ("dp-sgd", "local"):
            raise ConfigError(
                f"run-config 'resume' with 'dp' = '{self.dp}': each client's privacy ledger lives in its ClientApp's "
                "state, which a new run starts empty, so clients could spend their budget twice; start a new run"
            )

    def _check_dp_codec(self) -> None:
        """Refuse the (dp, codec) pairs whose guarantee would not hold (fedmm/privacy/update.py has the argument)."""
        codec = self.codec  # type: ignore[attr-defined]  # CompressionSettings
        if make_codec(codec).lossless:
            return
        if self.dp == "central-client":
            raise ConfigError(
                f"run-config 'codec' = '{codec}' with 'dp' = 'central-client': the server adds noise calibrated "
                "to the clipping norm to the update it decodes, Q(clipped update + error-feedback residual), and a "
                "lossy codec does not keep that within the norm (q2 alone nearly doubles it), so the reported "
                "epsilon would not hold; use dp = 'central-server' (it clips what it decodes) or codec = 'fp32'"
            )
        if self.dp == "distributed":
            raise ConfigError(
                f"run-config 'codec' = '{codec}' with 'dp' = 'distributed': each client's noise share would be "
                "encoded on its own by a lossy codec whose error is not bounded by the clipping norm, so the sum is "
                "not the Gaussian mechanism the accountant charges (an integer mechanism under secure aggregation "
                "is what makes this valid); use codec = 'fp32', or dp = 'central-server' or 'local'"
            )


@dataclass(frozen=True)
class ConstraintSettings:
    """Fairness and toxicity constraints (fedmm.constraints, strategies/constraints.py)."""

    constraints: str = key(
        "",
        "constraints training must honour, comma-separated: group-gap (zero-shot accuracy gap between groups "
        "<= max-group-gap), toxicity (toxic top-1 retrieval rate <= max-toxic-rate); empty = none (still measured)",
        _constraint_list,
    )
    max_group_gap: float = key(0.05, "threshold of the group-gap constraint", unit_interval)
    max_toxic_rate: float = key(0.01, "threshold of the toxicity constraint", unit_interval)
    dual_step_group_gap: float = key(5.0, "dual ascent step of the group-gap multiplier (lambda)", positive)
    dual_step_toxicity: float = key(5.0, "dual ascent step of the toxicity multiplier (mu)", positive)

    @property
    def constraint_list(self) -> list[str]:
        return list(dict.fromkeys(p.strip() for p in self.constraints.split(",") if p.strip()))

    @property
    def constraint_limits(self) -> dict[str, tuple[float, float]]:
        """constraint -> (threshold, dual step), for the constraints the run enforces."""
        limits = {"group-gap": (self.max_group_gap, self.dual_step_group_gap),
                  "toxicity": (self.max_toxic_rate, self.dual_step_toxicity)}
        return {name: limits[name] for name in self.constraint_list}


@dataclass(frozen=True)
class CompressionSettings:
    """Codecs of both links (fedmm.compression)."""

    codec: str = key("fp32", "uplink codec: [topk<f>+](fp32|fp16|bf16|q8|q4|q2)[-row]", parses(make_codec))
    codec_downlink: str = key("fp32", "downlink codec for the global adapter (dense only)", parses(make_codec))
    error_feedback: bool = key(True, "clients carry the compression error into their next update")

    def _check_compression(self) -> None:
        if "topk" in self.codec_downlink:
            raise ConfigError(
                "run-config 'codec-downlink': top-k would drop most of the global adapter; "
                "use a dense codec (fp16, bf16, q8, ...)"
            )


@dataclass(frozen=True)
class RunSettings:
    """The run itself: seed, output folder, resumption, caches."""

    seed: int = key(0, "seed of everything random in the run", non_negative)
    output_dir: str = key("", "report folder; empty = ~/fedmm-runs/<timestamp>")
    resume: bool = key(False, "continue the run in output-dir after its last completed round (its checkpoint); "
                              "the run config must be the checkpoint's, num-server-rounds and round-timeout aside")
    cache_dir: str = key("", "base-checkpoint cache; empty = $XDG_CACHE_HOME/fedmm or ~/.cache/fedmm")

    def _check_run(self) -> None:
        if self.resume and not self.output_dir:
            raise ConfigError("run-config 'resume' = true needs 'output-dir': the folder of the run to continue")

    @property
    def cache_path(self) -> Path:
        """The base-checkpoint cache: the one setting read from the environment (XDG's convention)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "fedmm"
