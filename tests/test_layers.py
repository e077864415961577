"""The codebase's shape, checked statically (no imports run): layers, cycles, module size.

- the library (``fedmm/``) imports none of ``strategies/``, ``server/``, ``clients/``;
- the clients import nothing of ``strategies/`` or ``server/``, the strategies nothing of ``server/`` or
  ``clients/`` (both sides share only ``fedmm/``, the wire protocol among it);
- no import cycle among the project's modules, counting lazy and type-checking imports;
- no module over 400 lines (one that long holds more than one concern);
- the ServerApp and the ClientApp never import ``fedmm.deploy`` (whatever a deployment changes in
  Flower, its launcher installs), and outside the seam (``fedmm/deploy/flower/``) fedmm imports from
  Flower only what Flower's own strategies, mods and examples use.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedmm", "server", "clients", "strategies")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:  # "fedmm.protocol.to_numpy" -> "fedmm.protocol"
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_lower_layers_never_import_higher_ones():
    forbidden = {"fedmm": {"strategies", "server", "clients"}, "clients": {"strategies", "server"},
                 "strategies": {"server", "clients"}, "server": {"clients"}}
    wrong = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
                   if _top(target) in forbidden[_top(name)])
    assert not wrong, wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_no_module_holds_more_than_one_concern_by_length():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_checks_see_a_known_edge_and_would_see_a_cycle():
    """The graph is real: the client mods import the wire protocol; a made-up back edge is a cycle."""
    assert "fedmm.protocol" in GRAPH["clients.compression_mod"]
    assert "fedmm.config" in GRAPH["server.chain"]
    assert "fedmm.model" in GRAPH["fedmm.config.model"]  # a lazy import inside a method counts
    back = {name: set(targets) for name, targets in GRAPH.items()}
    back["fedmm.protocol"].add("clients.compression_mod")
    # the back edge closes a cycle through both (the path the search reports depends on the other edges)
    assert any(c[0] == c[-1] and {"clients.compression_mod", "fedmm.protocol"} <= set(c) for c in _cycles(back))
    assert not _cycles(GRAPH)


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


def test_neither_app_imports_the_deployment_layer():
    for app in ("server.app", "clients.app"):
        wrong = sorted(n for n in _closure(app) if n == "fedmm.deploy" or n.startswith("fedmm.deploy."))
        assert not wrong, f"{app} reaches {wrong}"


SEAM = "fedmm.deploy.flower"
# What Flower's own strategies, mods and examples import, by module: the Message API, the app types, the
# logger, the DP constants and accountant, the secure-aggregation primitives, and the parser of the
# documented ``--run-config`` syntax (so fedmm reads strategy-args and --run-config exactly as flwr does).
ALLOWED_FLWR = {
    "flwr.app": None,  # None: any public name
    "flwr.serverapp": None,
    "flwr.serverapp.strategy": None,
    "flwr.serverapp.strategy.strategy_utils": {"aggregate_metricrecords"},
    "flwr.clientapp": None,
    "flwr.clientapp.mod": None,
    "flwr.clientapp.typing": {"ClientAppCallable"},
    "flwr.common.constant": {"ErrorCode"},
    "flwr.common.config": {"parse_config_args"},
    "flwr.supercore": {"log"},
    "flwr.supercore.logger": {"FLOWER_LOGGER"},
    "flwr.supercore.differential_privacy": {"KEY_CLIPPING_NORM"},
    "flwr.supercore.privacy_accounting": None,
    "flwr.supercore.privacy_accounting.rdp_accountant": {"RdpAccountant"},
    "flwr.supercore.primitives.asymmetric": None,
    "flwr.common.secure_aggregation.crypto.symmetric_encryption": {"decrypt", "encrypt", "generate_shared_key"},
}


def _flwr_imports(path: Path) -> set[tuple[str, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "flwr":
            found |= {(node.module or "", alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "flwr"}
    return found


def _outside_the_allowed_list(found: set[tuple[str, str]]) -> list[str]:
    wrong = []
    for module, name in sorted(found):
        allowed = ALLOWED_FLWR.get(module, set())
        if not name or name.startswith("_") or (allowed is not None and name not in allowed):
            wrong.append(f"{module}.{name}" if name else module)
    return wrong


def test_outside_the_seam_fedmm_imports_from_flower_only_its_public_api():
    wrong = {name: bad for name, path in _modules().items() if not (name == SEAM or name.startswith(SEAM + "."))
             if (bad := _outside_the_allowed_list(_flwr_imports(path)))}
    assert not wrong, f"Flower internals outside {SEAM}: {wrong}"
    seam = set().union(*(_flwr_imports(p) for n, p in _modules().items() if n.startswith(SEAM + ".")))
    # the check is real: the seam itself imports internals it would refuse
    assert "flwr.supernode.start_client_internal" in _outside_the_allowed_list(seam)
