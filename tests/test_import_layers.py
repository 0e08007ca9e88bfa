"""The project's structure, read from its own imports (every `import` and `from ... import`,
function-level ones included): no module imports itself back through others, no layer imports
one above it, the engine core imports no Kafka, Redis or store code, no private name crosses a
module boundary, and every class name is used once. docs/structure.md draws the same layers."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"services": "lorafleet", "kernels": "lorafleet.kernels", "bench": "lorafleet.bench"}

# Lowest first. A module may import its own layer and the ones below; the deepest prefix names a
# module's layer (lorafleet.engine.serving is not lorafleet.engine).
LAYERS = [
    "lorafleet.common",  # settings, the wire contract, messages, ids, Kafka / Redis helpers
    "lorafleet.formats",  # ModelSpec, PEFT parsing, LoraWeights, canonical adapter files
    "lorafleet.kernels",  # Triton kernels implementing the engine's op interface
    "lorafleet.engine",  # the engine core: scheduler, paging, model, ops, tensor parallelism
    "lorafleet.adapter_store",
    "lorafleet.engine.serving",  # the engine service: Kafka in, engine thread, Redis out
    "lorafleet.ingest",
    "lorafleet.gateway",  # the OpenAI-compatible HTTP API: contract requests out, reply streams in
    "lorafleet.health",
    "lorafleet.client",
    "lorafleet.client_cli",
    "lorafleet.adapter_tools",
    "lorafleet.demo",
    "lorafleet.supervisor",
    "lorafleet.stack",
    "lorafleet.cli",
    "lorafleet.bench",
]
# The one upward import allowed: kernels implement the engine's op interface (engine/ops/base.py).
ALLOWED_UPWARD = {("lorafleet.kernels", "lorafleet.engine.ops.base")}
# What the engine core must never reach: the service's I/O and the store.
NOT_IN_ENGINE_CORE = ("aiokafka", "redis", "lorafleet.adapter_store", "lorafleet.common.kafka",
                      "lorafleet.common.replies", "lorafleet.engine.serving")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:  # `from package import module` imports the module
                full = f"{base}.{alias.name}"
                out.append((full, []) if full in MODULES else (base, [alias.name]))
    return out


def _owner(name: str) -> str | None:
    """The project module an imported dotted name belongs to (None: not ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for imported, _names in _imports(module, path):
            owner = _owner(imported)
            if owner is not None and owner != module:
                graph[module].add(owner)
    return graph


def _layer(module: str) -> int:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS (and docs/structure.md)"
    return max(matches, key=lambda i: len(LAYERS[i]))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in MODULES:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"lorafleet.cli": {"lorafleet.stack"}, "lorafleet.stack": {"lorafleet.cli"}}) == [
        ["lorafleet.cli", "lorafleet.stack"]]


def test_no_layer_imports_one_above_it():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            allowed = any(module.startswith(src) and target == dst for src, dst in ALLOWED_UPWARD)
            if _layer(target) > _layer(module) and not allowed:
                upward.append(f"{module} -> {target}")
    assert upward == [], "upward imports (LAYERS is lowest first):\n" + "\n".join(sorted(upward))


def test_the_engine_core_imports_no_kafka_redis_or_store_code():
    core = [m for m in MODULES if _layer(m) == LAYERS.index("lorafleet.engine")]
    assert "lorafleet.engine.engine" in core and "lorafleet.engine.serving.service" not in core
    reached = [f"{module} -> {imported}" for module in core for imported, _ in _imports(module, MODULES[module])
               if imported.startswith(NOT_IN_ENGINE_CORE)]
    assert reached == []


def test_no_private_name_is_imported_from_another_module():
    private = [f"{module}: {name} from {imported}" for module, path in MODULES.items()
               for imported, names in _imports(module, path) if _owner(imported) not in (None, module)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_every_class_name_is_used_once():
    where = defaultdict(list)
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(module)
    assert {name: modules for name, modules in where.items() if len(modules) > 1} == {}


def test_every_project_import_resolves():
    """Function-level imports too (a moved module breaks them only when the function runs)."""
    import importlib
    import importlib.util

    def is_submodule(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent is a module, not a package
            return False

    broken = []
    for module, path in MODULES.items():
        for imported, names in _imports(module, path):
            if not imported.startswith("lorafleet") or _owner(imported) is None:
                continue
            target = importlib.import_module(_owner(imported))
            broken += [f"{module}: {imported}.{name}" for name in names
                       if not hasattr(target, name) and not is_submodule(f"{_owner(imported)}.{name}")]
    assert broken == []
