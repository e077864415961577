"""SecAgg+'s secrets: seeds, the keys derived from them, their one-block Shamir shares, the mask PRG.

Everything cryptographic is a library's: ECDH + HKDF and Fernet as Flower uses them
(``flwr.common.secure_aggregation.crypto``, ``flwr.supercore.primitives.asymmetric``), HKDF-SHA256 and
ChaCha20 from ``cryptography``, Shamir's scheme over GF(2^128) from pycryptodome (what Flower's
``create_shares`` wraps; called directly so that a 16-byte seed is one block, where Flower's padding makes
it two). A mask is the ChaCha20 keystream under a 32-byte key, not Flower's ``pseudo_rand_gen``: that one
folds the seed into 32 bits for numpy's RandomState (a 2^32 search finds it) and draws from [0, 2^b - 2],
so one ring value never appears and a masked value is not uniform.
"""

from __future__ import annotations

import base64

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from Crypto.Protocol.SecretSharing import Shamir
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    private_key_to_bytes,
    public_key_to_bytes,
)

from .integer import ring_dtype

# the order of SECP384R1, the curve of Flower's key pairs (ec.derive_private_key accepts n - 1, refuses n)
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
SEED_BYTES = 16  # a shared secret is one block of pycryptodome's Shamir (GF(2^128))
SHARE_BYTES = 4 + SEED_BYTES  # one share: its 4-byte index, then the block
_NONCE = b"fedmm-secagg-prg"  # 16 bytes; every seed is fresh per round, so one fixed nonce is safe


def prg_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` values uniform over Z_{2^b} from a 32-byte seed (ChaCha20 keystream)."""
    dtype = ring_dtype(bits)
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(
        bytes(length * np.dtype(dtype).itemsize))
    return np.frombuffer(stream, dtype=dtype) & dtype((1 << bits) - 1)


def split_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """t-of-n Shamir shares of a one-block secret (pycryptodome, GF(2^128)): 4-byte index + 16-byte share."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"split_secret: a secret of {len(secret)} bytes, expected {SEED_BYTES}")
    return [index.to_bytes(4, "little") + share for index, share in Shamir.split(threshold, num, secret, ssss=False)]


def combine_secret(shares: list[bytes]) -> bytes:
    """The secret of ``split_secret`` from ``threshold`` of its shares (ValueError on a malformed share)."""
    if any(not isinstance(s, bytes) or len(s) != SHARE_BYTES for s in shares):
        raise ValueError("combine_secret: a share is not 4 + 16 bytes")
    return Shamir.combine([(int.from_bytes(s[:4], "little"), s[4:]) for s in shares], ssss=False)


def _expand(seed: bytes, purpose: bytes, length: int) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=b"fedmm-secagg-" + purpose).derive(seed)


def self_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """A client's self-mask PRG(b): the ChaCha20 keystream under a 32-byte key expanded from its seed b."""
    return prg_mask(_expand(seed, b"self-mask", 32), length, bits)


def mask_key_from_seed(seed: bytes) -> bytes:
    """The PEM private key of the mask-agreement pair derived from a SEED_BYTES (16-byte) seed: FIPS 186-4 B.4.1 (an
    integer c 64 bits longer than the order n, d = c mod (n - 1) + 1), c from HKDF-SHA256 of the seed."""
    c = _expand(seed, b"mask-key", 56)
    key = ec.derive_private_key(int.from_bytes(c, "big") % (_P384_ORDER - 1) + 1, ec.SECP384R1())
    return private_key_to_bytes(key)


def agreed_seed(private_key: bytes, public_key: bytes) -> bytes:
    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(private_key),
                                                        bytes_to_public_key(public_key)))



def public_key_problem(key: object) -> str | None:
    """Why ``key`` is not a public key of the protocol's curve (PEM, SECP384R1, as Flower's key pairs), or None.

    A key that does not parse, or one of another curve or algorithm, would fail every honest neighbour's key
    agreement at the share stage: the server checks each on arrival and drops only its sender."""
    if not isinstance(key, bytes):
        return f"a {type(key).__name__}, not PEM bytes"
    try:
        parsed = bytes_to_public_key(key)
    except Exception as exc:  # noqa: BLE001 - cryptography raises ValueError, TypeError or its own for bad PEM
        return f"not a PEM public key ({type(exc).__name__})"
    if not isinstance(parsed, ec.EllipticCurvePublicKey):
        return f"a {type(parsed).__name__.lstrip('_')}, not an elliptic-curve key"
    if not isinstance(parsed.curve, ec.SECP384R1):
        return f"a key on {parsed.curve.name}, the protocol's curve is secp384r1"
    return None


def public_of(private_key: bytes) -> bytes | None:
    try:
        return public_key_to_bytes(bytes_to_private_key(private_key).public_key())
    except (ValueError, TypeError):
        return None
