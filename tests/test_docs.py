"""The documentation holds together: the generated reference is what the code declares, the site builds with
no broken link or orphan page, the README stays two screens with its two commands, and every figure on the
results page names its date, commit and a command that exists."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from fedmm import protocol
from fedmm.cli import build_parser, main
from fedmm.config import SPEC
from fedmm.config.declare import valid_values
from fedmm.reference import pages

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"


def test_the_committed_reference_is_what_the_code_generates():
    assert main(["reference", "--check", "--out", str(REFERENCE)]) == 0


def test_reference_check_fails_on_a_page_that_drifted_from_the_code(tmp_path, capsys):
    assert main(["reference", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"run-config.md", "node-config.md", "cli.md"}
    assert main(["reference", "--check", "--out", str(tmp_path)]) == 0
    page = tmp_path / "run-config.md"
    page.write_text(page.read_text().replace("LoRA rank r", "LoRA rank"))
    assert main(["reference", "--check", "--out", str(tmp_path)]) == 1
    assert "run-config.md" in capsys.readouterr().err


def test_every_run_config_key_is_in_the_reference_with_its_default_and_what_it_accepts():
    page = pages(build_parser())["run-config.md"]
    for name, spec in SPEC.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert f"| {spec.type.__name__} |" in row
        if spec.check is not None:
            assert valid_values(spec.check), f"{name}: its check does not say what it accepts"


def test_every_node_config_key_the_clients_read_is_declared_and_in_the_reference():
    constants = {v for k, v in vars(protocol).items() if k.startswith("NODE_") and isinstance(v, str)}
    assert constants == set(protocol.NODE_CONFIG)
    page = pages(build_parser())["node-config.md"]
    assert all(f"| `{name}` |" in page for name in constants)


def _commands(parser: argparse.ArgumentParser, path: str = "fedmm"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub
                yield from _commands(sub, f"{path} {name}")


def test_every_command_and_option_has_help_and_is_in_the_reference():
    page = pages(build_parser())["cli.md"]
    for path, sub in _commands(build_parser()):
        assert f"## `{path}`" in page
        for action in sub._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{path} {action.option_strings or action.dest}: no help text"


def test_the_documentation_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, or a page left out of the nav, fails."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1",
                                                                         "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "run-config" / "index.html").is_file()


def test_the_readme_fits_two_screens_and_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 100
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks == ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fedmm run", ci]


def _results_rows() -> list[list[str]]:
    rows = []
    for line in (ROOT / "docs" / "benchmarks.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] != "question":
            rows.append(cells)
    return rows


def test_every_figure_on_the_results_page_names_its_date_commit_and_an_existing_command():
    rows = _results_rows()
    assert len(rows) >= 30
    for question, figure, date, commit, command in rows:
        if figure.startswith("not yet"):  # a question still open says so, with the command that will answer it
            assert command, question
            continue
        assert re.fullmatch(r"2026-\d\d-\d\d", date), question
        assert re.fullmatch(r"[0-9a-f]{7,40}", commit), question
        for script in re.findall(r"(benchmarks/[\w/.-]+\.(?:py|toml))", command):
            assert (ROOT / script).is_file(), f"{question}: {script}"
        assert re.findall(r"benchmarks/[\w/.-]+\.(?:py|toml)", command) or "fedmm run" in command or \
            "benchmarks-log.md" in command, question


GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]


def test_every_run_config_in_the_readme_and_guides_is_valid():
    """Each `--run-config "..."` example validates as `fedmm run` would (an '@file' list is inlined by the CLI,
    so here it stands for a list of names)."""
    from fedmm.config import Settings
    from fedmm.config.text import parse_run_config

    examples = [m.group(1) for path in GUIDES for m in re.finditer(r'--run-config "([^"]*)"', path.read_text())]
    assert len(examples) >= 5
    for text in examples:
        Settings.from_run_config(parse_run_config(re.sub(r"'@[^']+'", "'a,b'", text)), server_files=False)


def test_every_experiment_file_in_the_guides_and_benchmarks_loads(tmp_path):
    from fedmm.experiment import load_experiment

    blocks = [block for path in GUIDES for block in re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)
              if "[experiment]" in block]  # (the method author's guide also shows a pyproject table)
    files = [tmp_path / f"guide-{i}.toml" for i in range(len(blocks))]
    for path, block in zip(files, blocks):
        path.write_text(block)
    files += sorted((ROOT / "benchmarks" / "experiments").glob("*.toml"))
    assert len(files) >= 5
    for path in files:
        exp = load_experiment(path)
        assert exp.points and exp.seeds, path
