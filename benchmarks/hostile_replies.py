"""Hostile replies through the server's whole strategy chain: kinds tried, counts, crashes (goal 0).

Runs the fuzz harness of tests/test_hostile_replies.py (honest replies mixed
with malformed ones, through ``server.chain.make_strategy``'s chain) for its six
strategy/codec chains, and tallies what each hostile reply was dropped for.
A crash is an exception escaping ``aggregate_train``/``aggregate_evaluate``;
"honest aggregate unchanged" compares every round, bit for bit, with the run
of the honest replies alone.

    .venv/bin/python benchmarks/hostile_replies.py [--rounds 20]

``--secagg N`` runs instead the secure-aggregation stage fuzz of tests/test_secagg_hostile.py for N rounds,
``--asynchronous N`` the asynchronous loop fuzz of tests/test_async_hostile.py, N seeds per configuration.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the harness imports the suite's conftest helpers


def _harness():
    spec = importlib.util.spec_from_file_location("hostile", ROOT / "tests" / "test_hostile_replies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kind_of(reason: str) -> str:
    """A drop reason without its particulars (names, numbers, values)."""
    reason = reason.split(" (the round's")[0]
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\[[^\]]*\]", "[…]", reason)
    reason = re.sub(r"-?\d[\d.e+-]*", "N", reason)
    return reason[:90]


def secure_aggregation(trials: int) -> None:
    """The stage fuzz of tests/test_secagg_hostile.py, ``trials`` rounds: 3 of 10 clients answer one stage each
    with a crafted reply. A crash is an exception escaping the chain; 'exact' means the released mean is the
    contributors' and exactly the hostile senders were dropped."""
    import test_secagg_hostile as t

    kinds: Counter[str] = Counter()
    original = t._bad_stage_reply

    def counted(rng, stage, request, reply):
        out, kind = original(rng, stage, request, reply)
        kinds[f"{stage}: {kind}"] += 1
        return out, kind

    t._bad_stage_reply = counted
    crashes = wrong = 0
    start = time.perf_counter()
    for trial in range(trials):
        try:
            t.test_hostile_stage_replies_drop_only_their_senders_and_the_mean_stays_exact(trial)
        except AssertionError:
            wrong += 1
        except Exception as exc:  # noqa: BLE001 - what this benchmark counts
            crashes += 1
            print(f"trial {trial}: CRASH {type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    hostile = 3 * trials
    kinds["keys: crafted public key"] = hostile - sum(kinds.values())
    print("| rounds | hostile replies | crashes | rounds not exact or a wrong drop | seconds |")
    print("|---|---|---|---|---|")
    print(f"| {trials} | {hostile} | {crashes} | {wrong} | {seconds:.1f} |\n")
    print("| stage: kind | count |\n|---|---|")
    for kind, count in sorted(kinds.items()):
        print(f"| {kind} | {count} |")


def asynchronous(repeats: int) -> None:
    """The loop fuzz of tests/test_async_hostile.py: every configuration (plain, delay compensation, central
    DP with and without it, central-client) at buffer sizes 2 and 3, ``repeats`` seeds each."""
    import random as py_random

    import test_async_hostile as t

    import strategies
    from fedmm.protocol import to_record

    kinds: Counter[str] = Counter()
    runs = crashes = non_finite = vetoed = 0
    start = time.perf_counter()
    for seed in range(repeats):
        for config in t.CONFIGS:
            for buffer_size in (2, 3):
                py_random.seed(seed)
                grid = t._HostileFederation(seed=1000 * seed + buffer_size)
                loop, recorder, _ = t._loop(grid, rounds=8, **{"buffer-size": buffer_size, "round-timeout": 5.0,
                                                               "min-nodes": 2, **config})
                runs += 1
                try:
                    loop.run(to_record(t._global()))
                except Exception as exc:  # noqa: BLE001 - what this benchmark counts
                    crashes += 1
                    print(f"{config} K={buffer_size}: CRASH {type(exc).__name__}: {exc}")
                    continue
                kinds.update(grid.kinds)
                non_finite += sum(not all(np.all(np.isfinite(v)) for v in a.values()) for _, a in recorder.calls)
                if "dp" in config:
                    ledger = next(w for w in strategies.wrapper_chain(loop.chain.stateful)
                                  if hasattr(w, "privacy_spent"))
                    vetoed += loop.version - ledger.privacy_spent().num_releases
    seconds = time.perf_counter() - start
    print("| runs (8 aggregations each) | hostile replies | crashes | non-finite globals | central-DP "
          "aggregations not released | seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| {runs} | {sum(kinds.values())} | {crashes} | {non_finite} | {vetoed} | {seconds:.1f} |\n")
    print("| kind | count |\n|---|---|")
    for kind, count in sorted(kinds.items()):
        print(f"| {kind} | {count} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--secagg", type=int, default=0, metavar="TRIALS",
                        help="instead: the secure-aggregation stage fuzz, this many rounds")
    parser.add_argument("--asynchronous", type=int, default=0, metavar="SEEDS",
                        help="instead: the asynchronous loop fuzz, this many seeds per configuration")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, attr, 1)
    if args.secagg:
        return secure_aggregation(args.secagg)
    if args.asynchronous:
        return asynchronous(args.asynchronous)
    h = _harness()
    h.ROUNDS = args.rounds
    from fedmm.config import Settings
    from server.chain import find_wrapper
    from strategies.compression import CompressedUpdates
    from strategies.replies import ReplyCheck
    from strategies.validation import UpdateValidation

    kinds: Counter[str] = Counter()
    crashes, hostile, unchanged = 0, 0, True
    start = time.perf_counter()
    for config in h.CHAINS:
        settings = Settings.from_run_config({**config, "lora-rank": h.RANK, "min-nodes": 2})
        honest, _ = h._run(settings, with_hostile=False, seed=1)
        try:
            mixed, chain = h._run(settings, with_hostile=True, seed=1)
        except Exception as exc:  # noqa: BLE001 - what this benchmark counts
            crashes += 1
            print(f"{config}: CRASH {type(exc).__name__}: {exc}")
            continue
        hostile += 2 * args.rounds * h.HOSTILE
        for (a_h, t_h, e_h), (a_m, t_m, e_m) in zip(honest, mixed):
            same = a_h is not None and a_m is not None and all(np.array_equal(a_m[k], a_h[k]) for k in a_h)
            unchanged &= same and t_h == t_m and e_h == e_m
        for wrapper, stage in ((ReplyCheck, "reply check"), (CompressedUpdates, "codec"),
                               (UpdateValidation, "validation")):
            for drop in find_wrapper(chain, wrapper).drops:
                kinds[f"{stage}: {kind_of(drop['reason'])}"] += 1
    seconds = time.perf_counter() - start
    print("| chains | hostile replies | dropped | crashes | honest aggregate unchanged | seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(h.CHAINS)} | {hostile} | {sum(kinds.values())} | {crashes} | {'yes' if unchanged else 'NO'} "
          f"| {seconds:.1f} |")
    print(f"\n{len(kinds)} kinds of drop reason:\n")
    print("| where | count |")
    print("|---|---|")
    for kind, count in kinds.most_common():
        print(f"| {kind} | {count} |")


if __name__ == "__main__":
    main()
