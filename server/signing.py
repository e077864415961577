"""Checkpoint signatures: an HMAC-SHA256 (Python's ``hmac``) of a round folder's files under a key kept
outside the output folder (``<cache-dir>/checkpoint-key``, made on first use, readable by its owner only).

Whoever can write the output folder but not read the key can neither edit a checkpoint nor forge one
(server/checkpoint.py verifies before reading anything); they can delete it, or put back an older one this
key signed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from fedmm.config import ConfigError, Settings

SIGNATURE = "signature"  # in the round folder: hex HMAC-SHA256 of its files
SIGNED_FILES = ("adapter.safetensors", "state.safetensors", "state.json")
KEY_FILE = "checkpoint-key"  # in the cache dir: never in the output folder it protects
KEY_BYTES = 32


def checkpoint_key(settings: Settings) -> tuple[bytes, Path]:
    """The key checkpoints are signed with, and its file (``<cache-dir>/checkpoint-key``, made on first use)."""
    path = settings.cache_path / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
        try:
            os.link(tmp, path)  # atomic and never replaces: two processes making it agree on the first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"checkpoint key {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(f"checkpoint key {path}: {len(key)} bytes, expected {KEY_BYTES}")
    return key, path


def signature(folder: Path, key: bytes) -> str:
    mac = hmac.new(key, b"fedmm-checkpoint-v1", hashlib.sha256)
    for name in SIGNED_FILES:
        data = (folder / name).read_bytes()
        mac.update(name.encode() + len(data).to_bytes(8, "little") + data)
    return mac.hexdigest()


def sign(folder: Path, settings: Settings) -> None:
    """Write ``folder``'s signature (after its files)."""
    (folder / SIGNATURE).write_text(signature(folder, checkpoint_key(settings)[0]))


def verify(folder: Path, settings: Settings) -> None:
    """ConfigError naming the file unless ``folder``'s signature matches its files under this run's key."""
    key, key_path = checkpoint_key(settings)
    try:
        signed = (folder / SIGNATURE).read_text().strip()
        expected = signature(folder, key)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"checkpoint {folder}: unreadable or unsigned ({type(exc).__name__}: {exc})") from exc
    if not hmac.compare_digest(signed, expected):
        raise ConfigError(f"checkpoint {folder / SIGNATURE}: the signature does not match the checkpoint's files: "
                          f"they were altered, or signed with another key than {key_path}")
