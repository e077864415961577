"""The four packages type-check: mypy, as ``[tool.mypy]`` in pyproject.toml configures it, finds nothing,
and no check is silenced: no ``type: ignore`` anywhere in them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedmm", "server", "clients", "strategies")


def test_mypy_finds_nothing(tmp_path):
    from mypy import api

    out, err, code = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
                              *(str(ROOT / p) for p in PACKAGES)])
    assert code == 0, out[-4000:] + err[-2000:]


def test_no_check_is_silenced():
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            n = len(re.findall(r"#\s*type:\s*ignore", path.read_text()))
            if n:
                found[path.relative_to(ROOT).as_posix()] = n
    assert found == {}
