"""The app folder ``flwr run`` gets: exactly the files Flower would package, without walking ignored trees."""

from __future__ import annotations

from pathlib import Path

from flwr.cli.utils import collect_files, filter_paths_for_publish

from fedmm.deploy.flower.app_files import app_files, stage_app

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> None:
    for rel, text in {
        "pyproject.toml": "[project]\nname = 'x'\n",
        ".gitignore": ".venv/\n*.pyc\nbuild/\nnested/skip/\n",
        "pkg/a.py": "A = 1\n",
        "pkg/a.pyc": "compiled",
        "pkg/data/table.json": "{}",
        ".venv/lib/site.py": "ignored",
        "build/out.py": "ignored",
        "nested/keep.py": "kept",
        "nested/skip/gone.py": "ignored",
        "README.md": "# x\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "pkg" / "link.py").symlink_to(root / "pkg" / "a.py")


def test_staged_app_holds_what_flower_would_package(tmp_path):
    app = tmp_path / "app"
    _tree(app)
    expected = filter_paths_for_publish(collect_files(app.resolve()))
    assert set(app_files(app)) == set(expected)
    assert "pkg/a.py" in expected and "nested/keep.py" in expected and ".venv/lib/site.py" not in expected

    staged = stage_app(app, tmp_path / "staged")
    copied = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert copied == set(expected)
    assert (staged / "pkg" / "a.py").read_text() == "A = 1\n"


def test_this_checkout_stages_the_same_files_as_flower_packages():
    assert set(app_files(ROOT)) == set(filter_paths_for_publish(collect_files(ROOT)))


def test_no_site_of_the_compose_rehearsal_can_write_the_cache_the_others_load():
    """Audit item 10: every container mounted one writable cache volume, so one site could replace the base
    model the ServerApp and the other sites load. Every SuperNode mounts it read-only."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    sites = {name: svc for name, svc in services.items() if name.startswith("supernode")}
    assert len(sites) == 3
    for name, svc in sites.items():
        cache = [v for v in svc["volumes"] if v.split(":")[-2 if v.endswith((":ro", ":rw")) else -1]
                 == "/root/.cache/fedmm"]
        assert cache and all(v.endswith(":ro") for v in cache), (name, svc["volumes"])
