"""Secrets: created private from the first byte, and each compose container mounts only its own."""

import os
import re
import stat
from pathlib import Path

import yaml

from fedmm.deploy import credentials as creds

ROOT = Path(__file__).resolve().parents[1]


def test_private_keys_are_created_0600_not_chmodded_after(tmp_path, monkeypatch):
    # with a permissive umask and every later chmod disabled, the files must still be owner-only
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    old = os.umask(0)
    try:
        creds.make_credentials(tmp_path, 2, ["127.0.0.1"])
    finally:
        os.umask(old)
    for name in ("ca.key", "server.key", "node-0", "node-1"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o600, f"{name} is {oct(mode)}"
    assert stat.S_IMODE((tmp_path / "node-0.pub").stat().st_mode) & 0o044  # public parts stay readable


def _mounts(service: dict) -> list[str]:
    """Container paths of a service's volumes ("${VAR:-./x}/f:/path:ro" -> "/path")."""
    return [re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1] for v in service.get("volumes", [])]


def test_each_compose_service_mounts_only_its_own_credentials():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    creds_of = {name: sorted(m for m in _mounts(s) if m.startswith("/credentials")) for name, s in services.items()}
    assert creds_of["credentials"] == ["/credentials"]  # the trusted step that makes them
    assert creds_of["superlink"] == ["/credentials/ca.crt", "/credentials/server.crt", "/credentials/server.key"]
    for i in range(3):
        assert creds_of[f"supernode-{i}"] == ["/credentials/ca.crt", f"/credentials/node-{i}"]
    assert creds_of["register"] == ["/credentials/ca.crt"] + [f"/credentials/node-{i}.pub" for i in range(3)]
    assert creds_of["job"] == ["/credentials/ca.crt"]
    for name, s in services.items():  # nothing but the credentials step sees the CA key or the whole folder
        if name != "credentials":
            assert all(":ro" in v for v in s.get("volumes", []) if "/credentials" in v), name
            assert not any("ca.key" in v for v in s.get("volumes", [])), name
