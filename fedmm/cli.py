"""The ``fedmm`` command.

``fedmm run``      the main job: validate the run config, build the base
                   checkpoint if missing (with progress), then run it in the
                   simulation (fedmm/deploy/simulation.py) or, with
                   --deployment, on a loopback deployment (fedmm/deploy/local.py);
                   print the report.
``fedmm pretrain`` build (or rebuild) the cached public-pretrained base.
``fedmm strategies`` list installed strategies, their descriptions and arguments.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from . import cli_data
from .config import ConfigError, Settings
from .config.data import inline_name_file
from .config.text import format_run_config, parse_run_config
from .deploy.processes import Interrupted, interruptible

log = logging.getLogger("fedmm")


def _validated(run_config: str, defaults: dict | None = None, local: bool = True) -> tuple[dict, Settings]:
    """Run-config overrides (over ``defaults``) and their settings, with ``output-dir`` filled in; fails before
    anything starts. ``local``: the run computes on this machine, which must have the device it names."""
    overrides = {**(defaults or {}), **parse_run_config(run_config or "")}
    for name in ("classes", "groups"):  # a name list from a file here travels inline to every site
        if isinstance(overrides.get(name), str):
            overrides[name] = inline_name_file(overrides[name], name)
    settings = Settings.from_run_config(overrides)  # fails here on a bad config, nothing started
    if local:
        from .device import DeviceUnavailable, resolve_device

        try:
            resolve_device(settings.device)
        except DeviceUnavailable as exc:
            raise ConfigError(f"run-config 'device' = {settings.device!r}: {exc}") from exc
    from . import strategy_registry as strategies

    from .methods import composition_problem

    try:
        problem = composition_problem(settings.strategy, strategies.load(settings.strategy), settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if problem:
        raise ConfigError(problem)
    if not settings.output_dir:
        overrides["output-dir"] = str(Path("runs").resolve() / datetime.now().strftime("%Y%m%d-%H%M%S"))
        settings = Settings.from_run_config(overrides)
    return overrides, settings


def _report(settings: Settings, code: int) -> int:
    summary = Path(settings.output_dir) / "summary.md"
    if code != 0:
        return code
    # `flwr run --stream` exits 0 even when the ServerApp failed: the report is the proof.
    if not summary.is_file():
        print(f"fedmm: the run did not complete (no report in {settings.output_dir}); see the log above", file=sys.stderr)
        return 1
    print(f"\nfedmm: report folder {settings.output_dir}\n")
    print(summary.read_text())
    return 0


def _site_manifests(args: argparse.Namespace) -> tuple[list[Path] | None, dict]:
    """``--sites FOLDER`` (``fedmm data export``'s layout): each SuperNode's manifest, and the name lists."""
    if not args.sites:
        return None, {}
    if not args.deployment:
        raise ConfigError("--sites gives each SuperNode its own folder: it needs --deployment")
    folder = Path(args.sites).expanduser().resolve()
    sites = [folder / f"site-{i}" / "manifest.jsonl" for i in range(args.clients)]
    missing = [str(m) for m in sites if not m.is_file()]
    if missing:
        raise ConfigError(f"--sites {folder}: no site manifest {missing[0]} (fedmm data export {folder} "
                          f"--sites {args.clients})")
    names = {key: f"@{folder / 'run' / f'{key}.txt'}" for key in ("classes", "groups")
             if (folder / "run" / f"{key}.txt").is_file()}
    return sites, names


def _check_simulation_resources(args: argparse.Namespace, settings: Settings) -> None:
    """--gpus-per-client and --ray-address: what the simulation can honour, refused before anything starts."""
    if args.deployment and args.ray_address:
        raise ValueError("--ray-address is the simulation's; with --deployment each SuperNode computes on its "
                         "own device (run-config 'device', node config 'device')")
    if not 0 <= args.gpus_per_client <= 1:
        raise ValueError(f"--gpus-per-client {args.gpus_per_client:g}: the share of one GPU a client reserves, "
                         "in (0, 1] (0: none)")
    if args.gpus_per_client and settings.device == "cpu":
        raise ValueError("--gpus-per-client with run-config 'device' = 'cpu': the clients would reserve GPUs "
                         "they do not use")
    if args.gpus_per_client and not args.ray_address:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--gpus-per-client: torch sees no CUDA device on this machine, so no client could start")


def cmd_run(args: argparse.Namespace) -> int:
    sites, names = _site_manifests(args)
    overrides, settings = _validated(args.run_config, names, local=not args.ray_address)
    _check_simulation_resources(args, settings)
    args.site_manifests = sites
    try:
        with interruptible():
            return _run(args, overrides, settings)
    except Interrupted as exc:
        latest = Path(settings.output_dir) / "checkpoint" / "latest.json"
        done = json.loads(latest.read_text()).get("server-round") if latest.is_file() else None
        where = (f"the last complete round's checkpoint (round {done}) is in {latest.parent}" if done
                 else "no round completed, so there is no checkpoint to continue from")
        print(f"\nfedmm: stopped by {exc}: every process this command started is stopped; {where}.", file=sys.stderr)
        if done:
            again = format_run_config({**overrides, "resume": True})
            print(f"fedmm: continue with: fedmm run --clients {args.clients} --run-config '{again}'"
                  + (" --deployment" if args.deployment else "") + (f" --sites {args.sites}" if args.sites else ""),
                  file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, overrides: dict, settings: Settings) -> int:
    if settings.pretrained == "public-pretrain":
        from .pretrain import ensure_base_checkpoint

        log.info("fedmm: base checkpoint %s", ensure_base_checkpoint(settings, progress=True))
    if args.deployment:
        from .deploy.local import LocalFederation

        home = Path(tempfile.mkdtemp(prefix="fedmm-deploy-"))
        log.info("fedmm: deployment engine, SuperLink + %d SuperNodes on 127.0.0.1 (%s; logs in %s); report -> %s",
                 args.clients, "insecure" if args.insecure else "TLS, node authentication",
                 home / "logs", settings.output_dir)
        with LocalFederation(home, args.clients, tls=not args.insecure, auth=not args.insecure,
                             sites=args.site_manifests, gpus_per_client=args.gpus_per_client) as federation:
            code = federation.run(Path(args.app), format_run_config(overrides))
    else:
        from .deploy.simulation import run_simulation

        log.info("fedmm: %d simulated clients; report -> %s", args.clients, settings.output_dir)
        code = run_simulation(Path(args.app), overrides, num_supernodes=args.clients, cpus_per_client=args.cpus_per_client,
                              gpus_per_client=args.gpus_per_client, ray_address=args.ray_address or None)
    return _report(settings, code)


def cmd_submit(args: argparse.Namespace) -> int:
    from .deploy.flwr_cli import submit

    overrides, settings = _validated(args.run_config, local=False) if not args.no_run else ({}, None)
    if args.insecure == bool(args.root_certificates):
        raise ConfigError("fedmm submit: give --root-certificates (TLS), or --insecure to go without TLS")
    code = submit(Path(tempfile.mkdtemp(prefix="fedmm-submit-")), args.superlink,
                  None if args.insecure else Path(args.root_certificates), Path(args.app),
                  None if args.no_run else format_run_config(overrides),
                  register_keys=[Path(key) for key in args.register], wait_nodes=args.wait_nodes)
    return code if settings is None else _report(settings, code)


def _passed_through(args: argparse.Namespace) -> list[str]:
    return args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args


def cmd_superlink(args: argparse.Namespace) -> int:
    from .deploy.flower.link import run_superlink

    return run_superlink(_passed_through(args))


def cmd_supernode(args: argparse.Namespace) -> int:
    from .deploy.supernode import run_supernode

    slots = Path(args.core_slots) if args.core_slots else None
    if slots is not None and args.slots:
        from .deploy.core_slots import make_core_slots

        make_core_slots(slots, args.slots)
    elif args.slots:
        raise ValueError("fedmm supernode --slots: give the folder the SuperNodes share with --device-slots FOLDER")
    return run_supernode(_passed_through(args), args.runtime_port, args.threads, slots)


def cmd_credentials(args: argparse.Namespace) -> int:
    from .deploy.credentials import make_credentials

    out = Path(args.out)
    make_credentials(out, args.nodes, args.hosts.split(","))
    print(f"fedmm: CA, SuperLink certificate for {args.hosts} and {args.nodes} SuperNode key pairs in {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import base_checkpoint_path, ensure_base_checkpoint

    settings = Settings.from_run_config(parse_run_config(args.run_config or ""))
    if args.force:
        base_checkpoint_path(settings).unlink(missing_ok=True)
    print(ensure_base_checkpoint(settings, progress=True))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import load_experiment, run_experiment
    from .experiment_report import write_comparison

    exp = load_experiment(Path(args.file))  # every point checked before the first run starts
    out = Path(args.out) if args.out else Path("runs") / "experiments" / exp.name
    try:
        with interruptible():
            finished = run_experiment(exp, out, log=lambda line: print(line, flush=True))
    except Interrupted as exc:
        print(f"\nfedmm: experiment stopped by {exc}; finished runs are kept. Continue with: fedmm experiment "
              f"{args.file}" + (f" --out {args.out}" if args.out else ""), file=sys.stderr)
        try:  # what the finished runs say so far; the continued experiment rewrites it
            paths = write_comparison(exp, out)
            print(f"fedmm: the finished runs' table: {paths['table']}", file=sys.stderr)
        except ValueError:  # none finished yet
            pass
        return 130
    total = len(exp.runs())
    paths = write_comparison(exp, out)
    print(f"\nfedmm: {len(finished)} of {total} runs finished; table {paths['table']}, plots in {out / 'plots'}; "
          f"live and finished curves: tensorboard --logdir {out / 'runs'}\n")
    print(paths["table"].read_text())
    return 0 if len(finished) == total else 1


def cmd_strategies(args: argparse.Namespace) -> int:
    from . import strategy_registry as strategies

    for name in sorted(strategies.available()):
        summary, params = strategies.describe(name)
        print(f"{name}: {summary}")
        own = {k: v for k, v in params.items() if k not in strategies.MANAGED}
        for key, (kind, default) in own.items():
            shown = "required" if default is inspect.Parameter.empty else f"default {default!r}"
            print(f"    {key} ({kind.__name__}, {shown})")
    print('\nSet them with --run-config "strategy=\'NAME\' strategy-args=\'key=value ...\'".')
    return 0


class _CliHandler(logging.StreamHandler):
    """The ``fedmm`` command's own console handler."""


def cmd_reference(args: argparse.Namespace) -> int:
    from .reference import pages

    out = Path(args.out)
    stale = []
    for name, text in pages(build_parser()).items():
        path = out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(path)
    if stale:
        print(f"fedmm: out of date with the code: {', '.join(stale)}; run 'fedmm reference'", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    # fedmm's own logger, not the root: the app processes clear the root of library handlers (fedmm/logs.py),
    # and a `fedmm supernode` process loads the ClientApp, which does that, into itself
    if not any(isinstance(h, _CliHandler) for h in log.handlers):  # once, however often main() runs
        handler = _CliHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a handler a library gave the root (Opacus's basicConfig) printed each line twice
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"fedmm: invalid run config: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # e.g. a manifest with no usable rows
        print(f"fedmm: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (docs/reference/cli.md is generated from it)."""
    parser = argparse.ArgumentParser(prog="fedmm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated job in Flower's simulation engine")
    run.add_argument("--run-config", default="", help='overrides, e.g. "num-server-rounds=5 lora-rank=4"')
    run.add_argument("--clients", type=int, default=10, help="simulated SuperNodes (partitions)")
    run.add_argument("--cpus-per-client", type=int, default=1, help="CPU cores each simulated client reserves "
                     "(Flower's client-resources-num-cpus)")
    run.add_argument("--gpus-per-client", type=float, default=0.0,
                     help="the share of a GPU each client takes (0.25: four clients per GPU at once); with "
                     "--deployment, the SuperNodes' device slots")
    run.add_argument("--ray-address", default="", help="simulation: join this Ray cluster (HOST:PORT of its head) "
                     "instead of starting one on this machine")
    run.add_argument("--app", default=".", help="the Flower app folder (this project)")
    run.add_argument("--deployment", action="store_true",
                     help="Flower's deployment engine: a real SuperLink and one SuperNode process per client on 127.0.0.1")
    run.add_argument("--insecure", action="store_true", help="with --deployment: no TLS and no node authentication")
    run.add_argument("--sites", default="", help="with --deployment: SuperNode i trains on FOLDER/site-<i>/manifest.jsonl "
                     "(fedmm data export's folders; its run/classes.txt and run/groups.txt become the run's lists)")
    run.set_defaults(fn=cmd_run)
    link = sub.add_parser("superlink", help="Flower's SuperLink with message payloads in memory (state in --database)",
                          description="Everything after -- goes to flower-superlink, e.g. --database state.db "
                                      "--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key "
                                      "--enable-supernode-auth")
    link.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-superlink's own options, after --")
    link.set_defaults(fn=cmd_superlink)
    node = sub.add_parser("supernode", help="a site's SuperNode with a long-lived ClientApp process",
                          description="Everything after -- goes to flower-supernode, e.g. --superlink HOST:PORT "
                                      "--root-certificates ca.crt --auth-supernode-private-key node-0 "
                                      "--node-config 'partition-id=0 num-partitions=3'")
    node.add_argument("--runtime-port", type=int, default=9094, help="the SuperNode's Runtime API port (loopback)")
    node.add_argument("--threads", type=int, default=None, help="torch threads of the ClientApp (default: torch's)")
    node.add_argument("--core-slots", "--device-slots", dest="core_slots", default="",
                      help="a folder of slot files shared by the SuperNodes of one machine: at most that many "
                      "ClientApp tasks run at once, on its cores or on the GPU the sites share")
    node.add_argument("--slots", type=int, default=0, help="with --core-slots/--device-slots: make that many slot "
                      "files in the folder if it has fewer (0: use the folder as it is)")
    node.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-supernode's own options, after --")
    node.set_defaults(fn=cmd_supernode)
    cred = sub.add_parser("credentials", help="TLS certificates and SuperNode keys for a deployment")
    cred.add_argument("--out", default="credentials", help="folder (existing files are kept)")
    cred.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs node-0 .. node-<N-1>")
    cred.add_argument("--hosts", default="127.0.0.1,localhost",
                      help="comma-separated names/addresses the SuperLink certificate is valid for")
    cred.set_defaults(fn=cmd_credentials)
    pre = sub.add_parser("pretrain", help="build the cached public-pretrained base")
    pre.add_argument("--run-config", default="", help="the model and pretraining keys of the base to build, "
                     "e.g. \"model='fedmm-tiny-vit'\"")
    pre.add_argument("--force", action="store_true", help="rebuild even if cached")
    pre.set_defaults(fn=cmd_pretrain)
    job = sub.add_parser("submit", help="register SuperNode keys and run a job on a deployed SuperLink")
    job.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    job.add_argument("--root-certificates", default="", help="CA certificate that signed the SuperLink's")
    job.add_argument("--insecure", action="store_true", help="no TLS (only where you really want that)")
    job.add_argument("--register", action="append", default=[], metavar="PUBLIC_KEY",
                     help="a SuperNode public key to register first (repeatable)")
    job.add_argument("--wait-nodes", type=int, default=1, help="SuperNodes that must be online before the run")
    job.add_argument("--run-config", default="", help="overrides, as for fedmm run; '@file' class and group "
                     "lists are inlined here")
    job.add_argument("--app", default=".", help="the Flower app folder (this project)")
    job.add_argument("--no-run", action="store_true", help="only register the keys")
    job.set_defaults(fn=cmd_submit)
    sub.add_parser("strategies", help="list installed strategies and their arguments").set_defaults(fn=cmd_strategies)
    exp = sub.add_parser("experiment", help="a grid of run configs over seeds, each an ordinary fedmm run; then the "
                         "comparison table and plots (run it again to continue an interrupted one)")
    exp.add_argument("file", help="the experiment's TOML file ([experiment], [base], [grid], [[points]])")
    exp.add_argument("--out", default="", help="its folder (default: runs/experiments/<name>)")
    exp.set_defaults(fn=cmd_experiment)
    cli_data.add_parser(sub)
    ref = sub.add_parser("reference", help="write the run-config, node-config and CLI reference pages (Markdown), "
                         "generated from their declarations")
    ref.add_argument("--out", default="docs/reference", help="the folder of the three pages")
    ref.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page differs from what the "
                     "code generates")
    ref.set_defaults(fn=cmd_reference)
    return parser


if __name__ == "__main__":
    sys.exit(main())
