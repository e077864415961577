"""``fedmm data``: inspect a manifest, export a dataset as one folder per site (fedmm/data/sites.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import Settings
from .config.data import inline_name_file, name_list
from .config.text import parse_run_config


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data.sites import inspect_manifest

    classes = name_list(inline_name_file(args.classes, "classes"), "classes")
    groups = name_list(inline_name_file(args.groups, "groups"), "groups")
    found = inspect_manifest(Path(args.manifest), classes, groups, decode=args.decode)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"{found['manifest']}: {found['rows']} rows, {found['kept']} kept, {len(found['skipped'])} skipped, "
          f"{found['prompted']} captioned by their class prompt")
    for file, why in found["skipped"].items():
        print(f"  skipped {file}: {why}")
    for title in ("per-split", "per-class", "per-group", "per-client"):
        print(f"{title}: " + ", ".join(f"{k} {v}" for k, v in sorted(found[title].items())))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .data.sites import export_sites

    settings = Settings.from_run_config(parse_run_config(args.run_config or ""))
    written = export_sites(settings, Path(args.out), args.sites)
    for folder, rows in written.items():
        print(f"{Path(args.out) / folder}: {rows} rows")
    print(f"run config for these folders: classes='@{Path(args.out) / 'run' / 'classes.txt'}' "
          f"groups='@{Path(args.out) / 'run' / 'groups.txt'}' server-dataset='{Path(args.out) / 'server' / 'manifest.jsonl'}'"
          f" public-dataset='{Path(args.out) / 'public' / 'manifest.jsonl'}'; each SuperNode: "
          f"--node-config \"dataset='{Path(args.out) / 'site-<i>' / 'manifest.jsonl'}'\"")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect a manifest; export a dataset as one manifest folder per site")
    actions = data.add_subparsers(dest="data_command", required=True)
    look = actions.add_parser("inspect", help="rows kept and skipped (with reasons), classes, groups, clients")
    look.add_argument("manifest", help="a CSV or JSONL manifest over an image folder")
    look.add_argument("--classes", default="", help="the run's class names (comma-separated, or @file)")
    look.add_argument("--groups", default="", help="the run's group names (comma-separated, or @file)")
    look.add_argument("--decode", action="store_true", help="decode every image in full (slower; finds truncated files)")
    look.add_argument("--json", action="store_true", help="print the counts as JSON")
    look.set_defaults(fn=cmd_inspect)
    export = actions.add_parser("export", help="the run's partitions of its dataset as site folders "
                                "(plus server/, public/ and run/ with the class and group lists)")
    export.add_argument("out", help="the folder to write site-0 .. site-<N-1>, server/, public/ and run/ into")
    export.add_argument("--sites", type=int, required=True, help="one folder per site: the run's partitions")
    export.add_argument("--run-config", default="", help="dataset and partitioning, e.g. \"partitioner='iid' seed=1\"")
    export.set_defaults(fn=cmd_export)
