"""One fedmm job in Flower's simulation engine, for the benchmarks that compare run configs."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(run_config: str, rounds: int, name: str) -> tuple[dict, object, Path]:
    """The benchmark's base run config (``--run-config`` plus its rounds), its settings, and a fresh work folder.

    The cached base model is built here, so no timed job pays for it.
    """
    from fedmm.config.text import parse_run_config
    from fedmm.config import Settings
    from fedmm.pretrain import ensure_base_checkpoint

    base = {**parse_run_config(run_config), "num-server-rounds": rounds, "min-nodes": 2}
    settings = Settings.from_run_config(base)
    if settings.pretrained == "public-pretrain":
        ensure_base_checkpoint(settings)
    return base, settings, Path(tempfile.mkdtemp(prefix=f"fedmm-bench-{name}-"))


def run_job(name: str, overrides: dict, clients: int, work: Path) -> tuple[dict, float]:
    """Run the app with ``overrides`` into ``work/name``; its metrics.json (rounds keyed by int) and wall seconds."""
    from fedmm.deploy.simulation import run_simulation

    out = work / name
    start = time.perf_counter()
    code = run_simulation(ROOT, {**overrides, "output-dir": str(out / "report")}, num_supernodes=clients,
                          flwr_home=out / "flwr", stream=False)
    if code != 0:
        raise SystemExit(f"{name}: job failed ({code}); logs under {out}")
    return load_report(out / "report" / "metrics.json"), time.perf_counter() - start


def load_report(path: Path) -> dict:
    data = json.loads(path.read_text())
    data["rounds"] = {int(k): v for k, v in data["rounds"].items()}
    return data


def adapter_dim(settings) -> int:
    """The values one update holds: the global adapter's size (what the ServerApp's plans are derived for)."""
    from fedmm import lora
    from fedmm.pretrain import load_base_model

    net = lora.attach_lora(load_base_model(settings, progress=False), settings.global_rank,
                           settings.lora_alpha_for(settings.global_rank), settings.lora_target_list)
    return sum(int(v.numel()) for v in lora.adapter_state(net).values())


def distributed_sigma(epsilon: float, clients: int, bits: int, threshold: int, settings, dim: int) -> float:
    """The smallest noise multiplier (to 0.1%) whose distributed plan (t = ``threshold``, no planned dropout)
    spends at most ``epsilon`` over the run's rounds: distributed DP at a given epsilon."""
    from fedmm.secagg.plan import SecAggPlan

    def spent(sigma: float) -> float:
        plan = SecAggPlan.of(clients, bits, threshold, settings.dp_clip_norm, sigma, 0.0)
        return plan.epsilon(dim, settings.num_server_rounds, settings.dp_delta)

    low, high = 0.05, 0.05
    while spent(high) > epsilon:
        low, high = high, high * 1.5
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return high
