"""CPU an idle loopback federation spends on polling: SuperLink, SuperNodes and ClientApp workers.

    .venv/bin/python benchmarks/idle_polling.py [--nodes 10] [--settle 90] [--seconds 30]

Starts ``LocalFederation`` (TLS, node auth, warm ClientApp workers) with no
run, waits ``--settle`` seconds for the workers' warm imports, then sums the
CPU time of every process the federation started over ``--seconds`` and
prints it per role as a share of one core. Nothing else should run.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import psutil


def role(cmdline: list[str]) -> str:
    line = " ".join(cmdline)
    if "fedmm.deploy.flower.node" in line:
        return "Flower SuperNode"
    if "superlink" in line.split(" --")[0]:
        return "SuperLink"
    if "supernode" in line.split(" --")[0]:
        return "ClientApp worker (fedmm supernode)"
    return cmdline[0].rsplit("/", 1)[-1] if cmdline else "?"


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, tuple[float, str]]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, role(p.cmdline()))
        except psutil.Error:
            pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--settle", type=float, default=90.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    from fedmm.deploy.local import LocalFederation
    from fedmm.deploy.processes import processes_under

    home = Path(tempfile.mkdtemp(prefix="fedmm-bench-idle-"))
    with LocalFederation(home, args.nodes):
        time.sleep(args.settle)
        procs = processes_under(home.resolve())
        before, start = cpu_seconds(procs), time.monotonic()
        time.sleep(args.seconds)
        after, elapsed = cpu_seconds(procs), time.monotonic() - start
    share, count = collections.Counter(), collections.Counter()
    for pid, (seconds, name) in after.items():
        if pid in before:
            share[name] += (seconds - before[pid][0]) / elapsed
            count[name] += 1
    print("| role | processes | CPU, share of one core |\n|---|---|---|")
    for name, value in share.most_common():
        print(f"| {name} | {count[name]} | {value:.1%} |")
    print(f"| total | {sum(count.values())} | {sum(share.values()):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
