"""MkDocs hook: the site's home page is README.md, its links made relative to docs/ (one text, two places)."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

README = Path(__file__).resolve().parents[2] / "README.md"


def on_files(files: Files, config) -> Files:
    text = README.read_text().replace("](docs/", "](")
    files.append(File.generated(config, "index.md", content=text))
    return files
