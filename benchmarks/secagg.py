"""Secure aggregation's core, in one process: wire bytes and seconds per stage, at 10 and 100 clients.

    .venv/bin/python benchmarks/secagg.py [--clients 10,100] [--dim 500000] [--bits 16] [--drop 0.1] [--noise 0]

Runs SecAgg+'s four stages (fedmm/secagg/masking.py) over ``--clients``
clients whose updates are ``--dim`` floats (the default adapter's size),
encoded into Z_2^bits (clip, rotate, round, Skellam share: integer.py),
with ``--drop`` of them vanishing after sharing keys and ``--noise`` the
noise multiplier (0: the error of the mean is the encoding's alone). Reports, per client:
the masked payload against the same-width unmasked integer payload and the
fp32 update, the protocol's own bytes (public keys, encrypted shares,
commitment, unmask shares; sent and received), the seconds to encode, to
run the key stages and to mask; and the server's seconds to unmask. The
neighbourhood is the complete graph up to 15 clients and 2 log2(n) + 1
beyond (SecAgg+). No federation: transport costs are not in these numbers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmm.secagg import SecAggClient, SecAggServer, decode_sum, derive_code, encode_integer  # noqa: E402
from fedmm.secagg.graph import default_threshold, neighbourhood_size  # noqa: E402


def one_round(n: int, dim: int, bits: int, drop: float, noise: float, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    size = neighbourhood_size(n, drop)
    threshold = default_threshold(size)
    code = derive_code(dim, 1.0, bits, n, noise_multiplier=noise, threshold=threshold, seed=seed)
    updates = [rng.normal(0, 1e-3, dim) for _ in range(n)]
    ids = [int(i) for i in rng.choice(10**12, n, replace=False)]
    server = SecAggServer(ids, threshold, bits, code.length, size, rng=random.Random(seed))
    clients = {i: SecAggClient(i) for i in ids}
    gone = set(random.Random(seed).sample(ids, int(drop * n)))
    sent = {i: 0 for i in ids}
    got = {i: 0 for i in ids}
    seconds: dict[str, list[float]] = {"encode": [], "keys": [], "mask": []}

    def timed(kind: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        seconds[kind].append(time.perf_counter() - start)
        return out

    vectors = {i: timed("encode", encode_integer, u, code, rng) for i, u in zip(ids, updates)}
    keys = {}
    for i in ids:
        keys[i] = timed("keys", clients[i].public_keys)
        sent[i] += sum(map(len, keys[i]))
    forward = server.collect_keys(keys)
    shares = {}
    for i, k in forward.items():
        got[i] += sum(len(a) + len(b) for a, b in k.values())
        start = time.perf_counter()
        shares[i] = clients[i].share(k, threshold, bits, code.length)
        seconds["keys"][ids.index(i)] += time.perf_counter() - start
        sent[i] += sum(map(len, shares[i][0].values())) + len(shares[i][1])
    inbox = server.collect_shares(shares)
    masked = {}
    for i, c in inbox.items():
        got[i] += sum(map(len, c.values()))
        if i in gone:
            continue
        masked[i] = timed("mask", clients[i].mask, c, vectors[i])
    asks = server.collect_masked(masked)
    replies = {}
    for i, (alive, dead) in asks.items():
        got[i] += 8 * (len(alive) + len(dead))
        replies[i] = clients[i].unmask(alive, dead)
        sent[i] += sum(map(len, replies[i].values()))
    start = time.perf_counter()
    total = server.collect_unmask(replies)
    mean = decode_sum(total, code) / len(server.contributors)
    unmask = time.perf_counter() - start
    truth = np.mean([updates[ids.index(i)] for i in server.contributors], axis=0)
    payload = code.length * np.dtype(code.dtype).itemsize
    return {
        "clients": n, "neighbourhood": size, "threshold": threshold, "dropped": len(gone), "length": code.length,
        "masked-bytes": payload, "unmasked-bytes": payload, "fp32-bytes": 4 * dim,
        "protocol-sent": statistics.median(sent.values()), "protocol-received": statistics.median(got.values()),
        "encode-s": statistics.median(seconds["encode"]), "keys-s": statistics.median(seconds["keys"]),
        "mask-s": statistics.median(seconds["mask"]), "unmask-s": unmask,
        "mean-error": float(np.linalg.norm(mean - truth) / np.linalg.norm(truth)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--dim", type=int, default=500_000)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--drop", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.0, help="noise multiplier (0: the rounding error alone)")
    args = parser.parse_args()
    rows = [one_round(int(n), args.dim, args.bits, args.drop, args.noise) for n in args.clients.split(",")]
    print("| clients | neighbourhood, t | dropped | masked / unmasked / fp32 bytes | protocol bytes sent / "
          "received | uplink / unmasked | encode s | keys s | mask s | server unmask s | mean's rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['neighbourhood']}, {r['threshold']} | {r['dropped']} | {r['masked-bytes']:,} / "
              f"{r['unmasked-bytes']:,} / {r['fp32-bytes']:,} | {r['protocol-sent']:,.0f} / "
              f"{r['protocol-received']:,.0f} | {(r['masked-bytes'] + r['protocol-sent']) / r['unmasked-bytes']:.3f} | "
              f"{r['encode-s']:.3f} | {r['keys-s']:.3f} | {r['mask-s']:.3f} | "
              f"{r['unmask-s']:.3f} | {r['mean-error']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
