"""Behaviour regression: the same seed and run config give the same metrics.json, bit for bit.

Two jobs, each run in Flower's simulation engine exactly as ``fedmm run`` does:
- ``default``: the bundled default job shortened to 2 rounds (10 clients);
- ``tiny-lossy-constraints-dp``: the tiny model with a lossy codec (top-k + q4, error feedback), both
  constraints and client-level central DP, 2 rounds, 4 clients.

Each metrics.json is reduced to what the run computed: wall times, memory (RSS) and the run's own
folders are removed (they differ between any two runs), every other number is kept exactly; the
SHA-256 of that canonical JSON (sorted keys) is compared with the digest recorded in
``regression_digests.json``. ``--record`` writes the digests instead (do it only on a commit whose
behaviour is the reference, and say so in the commit message).

    .venv/bin/python benchmarks/regression.py            # check (exit 1 on a difference)
    .venv/bin/python benchmarks/regression.py --record   # record the reference digests
    .venv/bin/python benchmarks/regression.py --only tiny-lossy-dp-sgd
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs import prepare, run_job  # noqa: E402

DIGESTS = Path(__file__).with_name("regression_digests.json")
ROUNDS = 2

JOBS: dict[str, tuple[str, int]] = {  # name -> (run config, clients)
    "default": ("", 10),
    # Every DP mode that composes with constraints adds noise from fresh OS entropy, so no two runs of one
    # agree (by design: noise a seed reproduces protects nothing); DP-SGD's noise comes from Opacus's
    # seeded torch generator, and DP-SGD refuses constraints. Hence two tiny jobs: one with the lossy codec
    # and both constraints, one with the lossy codec and DP, whose digest keeps what the noise cannot move
    # (NOISE_FREE: the ledger, bytes, counts, steps, ranks, replies, the run config and the report's extras).
    "tiny-lossy-constraints": (
        "model='fedmm-tiny-vit' pretrain-steps=200 local-steps=4 codec='topk0.3+q4' codec-downlink='q8' "
        "error-feedback=true constraints='group-gap,toxicity' seed=3", 4),
    "tiny-lossy-dp-sgd": (
        "model='fedmm-tiny-vit' pretrain-steps=200 local-steps=4 codec='q4-row' codec-downlink='fp16' "
        "error-feedback=true dp='dp-sgd' dp-noise-multiplier=0.8 dp-clip-norm=1.0 dp-negatives=16 "
        "max-epsilon=50 seed=5", 4),
}

# What two identical runs legitimately disagree on: clocks, memory, and the run's own folders.
VOLATILE_SUFFIXES = ("-seconds", "-rss-mib")
VOLATILE_KEYS = {"output-dir", "cache-dir", "adapter-dir"}


NOISY_JOBS = {"tiny-lossy-dp-sgd"}
NOISE_FREE = ("bytes", "num-", "epsilon", "steps-done", "work-fraction", "lora-rank", "replies", "dropped",
              "clipped", "partition-id", "unit-weight", "fair-n-", "tox-images", "dp-sample-rate")


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if k not in VOLATILE_KEYS and not k.endswith(VOLATILE_SUFFIXES)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _noise_free(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in ("round", "phase") or any(part in k for part in NOISE_FREE)}


def digest(metrics_json: Path, noisy: bool = False) -> str:
    """SHA-256 of the metrics.json with its volatile entries removed (canonical JSON, sorted keys)."""
    data = _stable(json.loads(metrics_json.read_text()))
    if noisy:
        data["rounds"] = {r: _noise_free(row) for r, row in data["rounds"].items()}
        data["clients"] = [_noise_free(row) for row in data["clients"]]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run(name: str) -> str:
    config, clients = JOBS[name]
    base, _, work = prepare(config, ROUNDS, name)
    run_job(name, base, clients, work)
    return digest(work / name / "report" / "metrics.json", noisy=name in NOISY_JOBS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the digests instead of checking them")
    parser.add_argument("--only", choices=sorted(JOBS), action="append", help="run only this job (repeatable)")
    args = parser.parse_args()
    names = args.only or list(JOBS)
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {}
    failed = False
    for name in names:
        got = run(name)
        if args.record:
            recorded[name] = got
            print(f"{name}: recorded {got}")
        elif recorded.get(name) == got:
            print(f"{name}: same metrics.json ({got})")
        else:
            failed = True
            print(f"{name}: DIFFERENT metrics.json: {got}, recorded {recorded.get(name)}")
    if args.record:
        DIGESTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
