"""The files of a Flower app, as ``flwr run`` would package them, copied to a small folder.

``flwr run <dir>`` walks and resolves every file below ``dir`` before it
applies ``.gitignore`` (Flower's ``collect_files``): in a checkout with its
virtual environment that is tens of thousands of files and seconds per run
(docs/benchmarks-log.md). Here ignored directories are pruned during the walk,
then Flower's own publish filter (an internal of its CLI) decides what goes
in, so the FAB built from the staged folder has the same content. Without
usable internals ``stage_app`` hands ``flwr run`` the app folder itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import internals_usable


def app_files(app_dir: Path) -> dict[str, Path | bytes]:
    """Relative POSIX path -> file (or its content), for the files Flower would put in the app's FAB."""
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns

    root = app_dir.resolve()
    gitignore = root / ".gitignore"
    ignored = build_pathspec(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        # git never re-includes a file below an ignored directory, so nothing kept is pruned here
        dirnames[:] = [d for d in dirnames if not ignored.match_file((rel_dir / d).as_posix() + "/")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue  # Flower skips these too
            files[(rel_dir / name).as_posix()] = path
    return filter_paths_for_publish(files)


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's FAB files to ``dest`` (emptied first); returns the folder for ``flwr run``."""
    if not internals_usable():
        return app_dir
    if dest.exists():
        shutil.rmtree(dest)
    for rel, src in app_files(app_dir).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):  # Flower's filter may hand back a file's content rather than its path
            target.write_bytes(src)
        else:
            shutil.copy2(src, target)
    return dest
