"""SecAgg+ (Bell et al. 2020) for one round, apart from any transport: what each stage computes on each side.

The secrets and their cryptography (seeds, derived keys, one-block Shamir shares, the ChaCha20 mask PRG)
are ``keys.py``'s, the graph ``graph.py``'s; key pairs, shared keys (ECDH + HKDF) and authenticated
encryption (Fernet) are Flower's, as Flower uses them.

The stages (server -> each client -> server); every client has a neighbourhood (itself and its neighbours in
a random ring graph, as in SecAgg+; the complete graph when it is small), threshold t:

0. keys: each client makes two key pairs, one to encrypt shares (c), one to agree masks (s).
1. share: given its neighbours' public keys, a client draws a 16-byte self-mask seed b, splits b and the
   16-byte seed its s key was derived from (FIPS 186-4 B.4.1 over HKDF) into t-of-|neighbourhood| Shamir
   shares (one GF(2^128) block each: sharing the 306-byte PEM key instead made a 100-client unmask take
   minutes), encrypts each for its holder, and commits to b (SHA-256) so that a wrong reconstruction is
   caught.
2. mask: given the ciphertexts addressed to it, a client sends y = x + PRG(b) + sum_v +-PRG(KA(s, s_v))
   mod 2^b over the neighbours v that shared (+ when its id is the larger).
3. unmask: the server names to each client which neighbours sent y (their b is needed) and which shared
   but sent no y (their s key is needed); a client answers with its shares, never both kinds for one
   client and only once (the double-masking rule, enforced here on the client side).

The server rebuilds each contributor's b and each dropped client's s key from >= t shares, removes the
masks and holds the exact ring sum of the contributors' vectors. Semi-honest server: it follows the
protocol; a server that tells clients different stories about who dropped is not detected (SecAgg's
consistency round with signatures is not run). A hostile client can spoil the sum (its y is not
checked) but not crash the server: malformed replies drop their sender with a reason.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from dataclasses import dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from .graph import components, neighbourhoods
from .integer import RING_BITS, ring_dtype, ring_sum
from .keys import (
    SEED_BYTES,
    SHARE_BYTES,
    agreed_seed,
    combine_secret,
    mask_key_from_seed,
    prg_mask,
    public_key_problem,
    public_of,
    self_mask,
    split_secret,
)


class SecAggAbort(RuntimeError):
    """The round cannot complete (too few clients left at some stage); the reason names the stage.

    ``culprit``: the node the abort is attributed to, where one can be (its secret did not rebuild to what it
    committed to), else None."""

    def __init__(self, reason: str, culprit: int | None = None) -> None:
        super().__init__(reason)
        self.culprit = culprit


def _pack(src: int, dst: int, b_share: bytes, s_share: bytes) -> bytes:
    return b"".join([src.to_bytes(8, "little"), dst.to_bytes(8, "little"), len(b_share).to_bytes(4, "little"),
                     b_share, s_share])


def _unpack(plain: bytes) -> tuple[int, int, bytes, bytes]:
    cut = 20 + int.from_bytes(plain[16:20], "little")
    return int.from_bytes(plain[:8], "little"), int.from_bytes(plain[8:16], "little"), plain[20:cut], plain[cut:]


def ids_of(raw: bytes) -> list[int]:
    """Node ids from ``ids_bytes`` (Flower's node ids use all 64 bits; a record's ints are signed)."""
    if not isinstance(raw, bytes) or len(raw) % 8 or len(raw) < 8:
        raise ValueError("node ids: not a count and whole uint64 values")
    values = np.frombuffer(raw, dtype=np.uint64)
    if int(values[0]) != len(values) - 1:
        raise ValueError("node ids: the count does not match")
    return [int(i) for i in values[1:]]


def ids_bytes(ids: list[int]) -> bytes:
    """Node ids as uint64 bytes after their count (never empty: a record holds no empty bytes)."""
    return np.asarray([len(ids), *ids], dtype=np.uint64).tobytes()


@dataclass
class SecAggClient:
    """One client's side of one round; it keeps its secrets between the stages (``state`` / ``from_state``)."""

    node_id: int
    threshold: int = 0  # set by the server's share request, with the ring and the vector length
    bits: int = 0
    length: int = 0
    _own: tuple[bytes, bytes] = (b"", b"")
    _c_sk: bytes = b""
    _s_seed: bytes = b""  # the mask-agreement key is derived from it (mask_key_from_seed); it is what is shared
    _seed: bytes = b""
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    _b_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> my share of its self-mask seed
    _s_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> my share of its mask key
    _unmasked: bool = False

    @property
    def neighbourhood(self) -> tuple[int, ...]:
        """Who I share with (myself included), as the server's share request named them."""
        return tuple(sorted(self._keys))

    def public_keys(self) -> tuple[bytes, bytes]:
        """Stage 0: (encryption key, mask-agreement key), PEM."""
        c_sk, c_pk = generate_key_pairs()
        self._s_seed = secrets.token_bytes(SEED_BYTES)
        self._c_sk = private_key_to_bytes(c_sk)
        self._own = (public_key_to_bytes(c_pk), public_of(mask_key_from_seed(self._s_seed)) or b"")
        return self._own

    def share(self, keys: dict[int, tuple[bytes, bytes]], threshold: int, bits: int,
              length: int) -> tuple[dict[int, bytes], bytes]:
        """Stage 1: given my neighbourhood's public keys (mine included), the ciphertexts of my shares by
        holder and my commitment to b."""
        if self._seed or not self._own[0]:
            raise ValueError(f"node {self.node_id}: a share request before its keys, or a second one")
        if keys.get(self.node_id) != self._own:
            raise ValueError(f"node {self.node_id}: the neighbourhood's keys do not hold its own")
        if not 2 <= threshold <= len(keys):
            raise ValueError(f"node {self.node_id}: threshold {threshold} for a neighbourhood of {len(keys)}")
        if bits not in RING_BITS or length < 1:
            raise ValueError(f"node {self.node_id}: ring Z_2^{bits}, vector length {length}")
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise ValueError(f"node {self.node_id}: repeated public keys")
        self.threshold, self.bits, self.length = threshold, bits, length
        self._keys = dict(keys)
        self._seed = secrets.token_bytes(SEED_BYTES)
        holders = sorted(keys)
        b_shares = split_secret(self._seed, self.threshold, len(holders))
        s_shares = split_secret(self._s_seed, self.threshold, len(holders))
        out = {}
        for holder, b_share, s_share in zip(holders, b_shares, s_shares):
            if holder == self.node_id:
                self._b_shares[holder], self._s_shares[holder] = b_share, s_share
            else:
                key = generate_shared_key(bytes_to_private_key(self._c_sk), bytes_to_public_key(keys[holder][0]))
                out[holder] = encrypt(key, _pack(self.node_id, holder, b_share, s_share))
        return out, hashlib.sha256(self._seed).digest()

    def state(self) -> dict[str, int | bool | bytes | list[bytes]]:
        """My secrets and what I hold, as plain values (node ids as uint64 bytes), for the client's own state."""
        state: dict[str, int | bool | bytes | list[bytes]] = {
            "node": ids_bytes([self.node_id]), "threshold": self.threshold, "bits": self.bits,
            "length": self.length, "own": list(self._own), "c-sk": self._c_sk,
            "s-seed": self._s_seed,
            "seed": self._seed, "key-ids": ids_bytes(list(self._keys)),
            "key-c": [k[0] for k in self._keys.values()], "key-s": [k[1] for k in self._keys.values()],
            "b-ids": ids_bytes(list(self._b_shares)), "b-shares": list(self._b_shares.values()),
            "s-ids": ids_bytes(list(self._s_shares)), "s-shares": list(self._s_shares.values()),
            "unmasked": self._unmasked,
        }
        return {k: v for k, v in state.items() if v != b""}  # a record holds no empty bytes: absent = empty

    @classmethod
    def from_state(cls, state) -> SecAggClient:
        """The client ``state`` stored (a mapping of the values ``state`` returns)."""
        client = cls(ids_of(state["node"])[0], int(state["threshold"]), int(state["bits"]), int(state["length"]))
        client._own = (bytes(state["own"][0]), bytes(state["own"][1]))
        client._c_sk = bytes(state.get("c-sk", b""))
        client._s_seed = bytes(state.get("s-seed", b""))
        client._seed = bytes(state.get("seed", b""))
        client._keys = {i: (bytes(c), bytes(s)) for i, c, s in zip(ids_of(state["key-ids"]), state["key-c"],
                                                                    state["key-s"])}
        client._b_shares = dict(zip(ids_of(state["b-ids"]), map(bytes, state["b-shares"])))
        client._s_shares = dict(zip(ids_of(state["s-ids"]), map(bytes, state["s-shares"])))
        client._unmasked = bool(state["unmasked"])
        return client

    def mask(self, ciphertexts: dict[int, bytes], vector: np.ndarray) -> np.ndarray:
        """Stage 2: my ring vector, masked."""
        if vector.shape != (self.length,) or vector.dtype != ring_dtype(self.bits):
            raise ValueError(f"node {self.node_id}: vector {vector.shape} {vector.dtype}, expected ({self.length},)")
        if not set(ciphertexts) <= set(self._keys) - {self.node_id} or len(ciphertexts) + 1 < self.threshold:
            raise ValueError(f"node {self.node_id}: ciphertexts from {sorted(ciphertexts)}")
        for src, ciphertext in ciphertexts.items():
            key = generate_shared_key(bytes_to_private_key(self._c_sk), bytes_to_public_key(self._keys[src][0]))
            real_src, dst, b_share, s_share = _unpack(decrypt(key, ciphertext))
            if (real_src, dst) != (src, self.node_id):
                raise ValueError(f"node {self.node_id}: a share from {real_src} to {dst} came as from {src}")
            self._b_shares[src], self._s_shares[src] = b_share, s_share
        total = vector.astype(np.uint64) + self_mask(self._seed, self.length, self.bits)
        s_sk = mask_key_from_seed(self._s_seed)
        for other in ciphertexts:
            pairwise = prg_mask(agreed_seed(s_sk, self._keys[other][1]), self.length, self.bits)
            total = total + pairwise if self.node_id > other else total - pairwise.astype(np.uint64)
        return (total & np.uint64((1 << self.bits) - 1)).astype(ring_dtype(self.bits))

    def unmask(self, contributors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Stage 3: my share of b for each contributor and of the mask key for each dropped client."""
        if self._unmasked:
            raise ValueError(f"node {self.node_id}: a second unmask request in one round")
        both = set(contributors) & set(dropped)
        if both:  # both secrets of one client would let the server strip all of its masks
            raise ValueError(f"node {self.node_id}: asked for both shares of {sorted(both)}")
        if not (set(contributors) <= set(self._b_shares) and set(dropped) <= set(self._s_shares)):
            raise ValueError(f"node {self.node_id}: asked for shares it does not hold")
        if len(contributors) < self.threshold:
            raise ValueError(f"node {self.node_id}: {len(contributors)} contributors, threshold {self.threshold}")
        self._unmasked = True
        return {**{o: self._b_shares[o] for o in contributors}, **{o: self._s_shares[o] for o in dropped}}


@dataclass
class SecAggServer:
    """The server's side of one round: forwards what the clients exchange and removes the masks."""

    node_ids: list[int]
    threshold: int
    bits: int
    length: int
    neighbourhood_size: int
    rng: random.Random = field(default_factory=lambda: random.Random(secrets.randbits(64)))
    dropped: dict[int, str] = field(default_factory=dict)  # node -> stage and reason it left the round

    def __post_init__(self) -> None:
        self.groups = neighbourhoods(self.node_ids, self.neighbourhood_size, self.rng)
        smallest = min(len(g) for g in self.groups.values())
        if not 2 <= self.threshold <= smallest:
            raise ValueError(f"secure aggregation: threshold {self.threshold} must be in 2..{smallest} (the "
                             f"neighbourhood size of {len(self.node_ids)} clients)")
        self.alive: set[int] = set(self.node_ids)
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.commitments: dict[int, bytes] = {}
        self.shared: set[int] = set()
        self.masked: dict[int, np.ndarray] = {}
        self.contributors: list[int] = []  # whose vectors the sum holds (set by collect_unmask)

    def _drop(self, nid: int, why: str) -> None:
        self.dropped.setdefault(nid, why)
        self.alive.discard(nid)

    def _settle(self, stage: str, answered: set[int]) -> None:
        for nid in sorted(self.alive - answered):
            self._drop(nid, f"{stage}: no reply")
        if len(self.alive) < self.threshold:
            raise SecAggAbort(f"secure aggregation, {stage}: {len(self.alive)} clients left, threshold "
                              f"{self.threshold}; dropped: {self.dropped}")

    def collect_keys(self, replies: dict[int, object]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Stage 0 replies -> each live client's neighbours' public keys (stage 1 requests)."""
        for nid, keys in replies.items():
            if nid not in self.alive:
                continue
            if (not isinstance(keys, tuple) or len(keys) != 2 or not all(isinstance(k, bytes) for k in keys)
                    or len(set(keys)) != 2 or any(k in flat for k in keys for flat in self.keys.values())):
                self._drop(nid, "keys: malformed or repeated public keys")
                continue
            # parsed here, or one bad key would fail every honest neighbour's key agreement at the share stage
            problem = next((f"{name} key: {why}" for name, key in zip(("encryption", "mask-agreement"), keys)
                            if (why := public_key_problem(key))), None)
            if problem:
                self._drop(nid, f"keys: {problem}")
                continue
            self.keys[nid] = keys
        self._settle("keys", set(self.keys))
        return {nid: {o: self.keys[o] for o in self.groups[nid] if o in self.alive} for nid in self.alive}

    def collect_shares(self, replies: dict[int, object]) -> dict[int, dict[int, bytes]]:
        """Stage 1 replies -> the ciphertexts addressed to each live client, by source (stage 2 requests)."""
        inbox: dict[int, dict[int, bytes]] = {nid: {} for nid in self.alive}
        for nid, reply in replies.items():
            if nid not in self.alive:
                continue
            expected = {o for o in self.groups[nid] if o in self.keys} - {nid}
            ciphertexts, commitment = reply if isinstance(reply, tuple) and len(reply) == 2 else (None, None)
            if not (isinstance(ciphertexts, dict) and set(ciphertexts) == expected and isinstance(commitment, bytes)
                    and len(commitment) == 32 and all(isinstance(c, bytes) for c in ciphertexts.values())):
                self._drop(nid, "share: malformed ciphertexts or commitment")
                continue
            self.commitments[nid] = commitment
            for dst, ciphertext in ciphertexts.items():
                inbox.setdefault(dst, {})[nid] = ciphertext
        self._settle("share", set(self.commitments))
        self.shared = set(self.alive)
        return {nid: {src: c for src, c in inbox.get(nid, {}).items() if src in self.shared} for nid in self.alive}

    def collect_masked(self, replies: dict[int, object]) -> dict[int, tuple[list[int], list[int]]]:
        """Stage 2 replies -> to each contributor, its neighbours that contributed and that dropped (stage 3)."""
        for nid, y in replies.items():
            if nid not in self.alive:
                continue
            if not isinstance(y, np.ndarray) or y.shape != (self.length,) or y.dtype != ring_dtype(self.bits):
                self._drop(nid, f"mask: malformed: not a ({self.length},) vector of {np.dtype(ring_dtype(self.bits))}")
                continue
            if self.bits < 8 * y.dtype.itemsize and int(y.max(initial=0)) >> self.bits:
                self._drop(nid, f"mask: values outside Z_2^{self.bits}")
                continue
            self.masked[nid] = y
        self._settle("mask", set(self.masked))
        # dropouts can cut the graph: the masks then cancel within each part, and the unmask stage would let
        # the server compute each part's sum on its own. Nothing is unmasked.
        parts = components(set(self.masked), self.groups)
        if len(parts) > 1:
            sizes = sorted((len(p) for p in parts), reverse=True)
            raise SecAggAbort(f"secure aggregation, mask: the {len(self.masked)} contributors fell apart into "
                              f"{len(parts)} groups that share no neighbours (sizes {sizes}); unmasking would reveal "
                              f"each group's sum; dropped: {self.dropped}")
        out = {}
        for nid in self.alive:
            group = [o for o in self.groups[nid] if o in self.shared]
            out[nid] = ([o for o in group if o in self.masked], [o for o in group if o not in self.masked])
        return out

    def collect_unmask(self, replies: dict[int, object]) -> np.ndarray:
        """Stage 3 replies -> the exact ring sum of the contributors' vectors (uint64, reduced mod 2^b)."""
        shares: dict[int, list[bytes]] = {nid: [] for nid in self.shared}
        for nid in sorted(self.alive - set(replies)):
            self.dropped.setdefault(nid, "unmask: no reply (its vector still counts)")
        for nid, reply in replies.items():
            if nid not in self.alive:
                continue
            if not isinstance(reply, dict) or not all(isinstance(s, bytes) and len(s) == SHARE_BYTES and o in shares
                                                      for o, s in reply.items()):
                self._drop(nid, "unmask: malformed shares")
                continue
            for owner, share in reply.items():
                shares[owner].append(share)
        modulus = np.uint64((1 << self.bits) - 1)
        total = ring_sum(list(self.masked.values()), self.bits)
        for owner in sorted(self.shared):
            if owner in self.masked:  # a contributor: remove its self-mask
                seed = self._rebuild(owner, shares[owner], lambda s, o=owner: hashlib.sha256(s).digest()
                                     == self.commitments[o])
                total -= self_mask(seed, self.length, self.bits).astype(np.uint64)
            else:  # shared keys but sent no vector: remove the pairwise masks its neighbours added
                s_seed = self._rebuild(owner, shares[owner],
                                       lambda s, o=owner: public_of(mask_key_from_seed(s)) == self.keys[o][1])
                s_sk = mask_key_from_seed(s_seed)
                for other in self.groups[owner]:
                    if other in self.masked:
                        pairwise = prg_mask(agreed_seed(s_sk, self.keys[other][1]), self.length, self.bits)
                        total = total - pairwise.astype(np.uint64) if other > owner else total + pairwise
        self.contributors = sorted(self.masked)
        return total & modulus

    def _rebuild(self, owner: int, got: list[bytes], valid) -> bytes:
        """A secret from >= t shares, checked against its commitment; one bad share is tolerated."""
        if len(got) < self.threshold:
            raise SecAggAbort(f"secure aggregation, unmask: {len(got)} shares of node {owner}'s secret, threshold "
                              f"{self.threshold}; dropped: {self.dropped}")
        # t shares suffice (Shamir's cost grows with their number squared); rotating the window past each
        # share in turn leaves any one bad share out of some window
        t = self.threshold
        for start in range(len(got) if len(got) > t else 1):
            subset = (got[start:] + got[:start])[:t]
            try:
                secret = combine_secret(subset)
            except (ValueError, IndexError):
                continue
            if valid(secret):
                return secret
        # without verifiable secret sharing the server cannot tell an owner that shared inconsistent shares (or
        # committed to another seed) from two or more holders that answered wrong ones: it blames the owner
        raise SecAggAbort(f"secure aggregation, unmask: node {owner}'s secret does not rebuild from its "
                          f"{len(got)} shares to what it committed to", culprit=owner)
