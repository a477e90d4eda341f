"""The code's shape: no import cycles, no upward imports, small modules and functions.

The import graph is read from the source (every ``import`` statement, at the
top of a module or inside a function), so a late import that closes a cycle
counts. Importing ``pkg.mod`` also runs ``pkg/__init__.py``, so it is an edge
to each enclosing package the importer is not itself inside.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightcl_jax"

# Lower layers first; a module may import modules of its own layer or below. The most
# specific prefix names a module's layer.
LAYERS = (
    ("lightcl_jax._lazy", "lightcl_jax.registry", "lightcl_jax.model.layers",
     "lightcl_jax.process"),
    ("lightcl_jax.compiler", "lightcl_jax.data", "lightcl_jax.model", "lightcl_jax.metrics",
     "lightcl_jax.memory", "lightcl_jax.figures",
     "lightcl_jax.accounting.theory", "lightcl_jax.compiler"),
    ("lightcl_jax.config",),
    ("lightcl_jax.strategies",),
    ("lightcl_jax.training",),
    ("lightcl_jax.accounting.compiled",),
    ("lightcl_jax.deploy",),
)
# Package namespaces that re-export lazily (`lightcl_jax._lazy`): importing them runs
# nothing else, so they sit in the lowest layer (and the test holds them to it).
LAZY_PACKAGES = ("lightcl_jax", "lightcl_jax.accounting")
# A module holds one idea (the training package's are listed in BUILD.md); a function
# reads on one or two screens.
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node, module: str, is_package: bool, known) -> list[str]:
    """The lightcl_jax modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lightcl_jax"]
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".")[:len(module.split(".")) - node.level + is_package]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "lightcl_jax":
        return []
    # `from pkg import submodule` imports the submodule too.
    return [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, name, is_package, modules):
                parts = target.split(".")
                for depth in range(1, len(parts) + 1):
                    enclosing = ".".join(parts[:depth])
                    # Packages the importer is inside are already being imported.
                    if enclosing in modules and not (name + ".").startswith(enclosing + "."):
                        edges.add(enclosing)
        edges.discard(name)
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    if module in LAZY_PACKAGES:
        return 0
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer of tests/test_layout.py"
    return best


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_inside_lightcl_jax():
    graph = _graph()
    assert len(graph) > 40 and "lightcl_jax.training.loop" in graph
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, targets in _graph().items() for target in sorted(targets)
              if _layer(target) > _layer(module)]
    assert upward == []


def test_training_imports_nothing_from_accounting():
    """What both need (the compiled step, the process's memory figures) lives below both:
    `lightcl_jax.compiler`, `lightcl_jax.process`."""
    graph = _graph()
    upward = sorted(f"{module} imports {target}" for module, targets in graph.items()
                    if module.startswith("lightcl_jax.training")
                    for target in targets if target.startswith("lightcl_jax.accounting"))
    assert upward == []
    assert "lightcl_jax.compiler" in graph["lightcl_jax.training.step"]


def test_config_imports_neither_strategies_nor_training_nor_jax():
    graph = _graph()
    reachable, todo = set(), ["lightcl_jax.config"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    assert not any(m.startswith(("lightcl_jax.strategies", "lightcl_jax.training"))
                   for m in reachable), sorted(reachable)
    code = ("import sys\nimport lightcl_jax.config\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax'))\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_bad_flag_is_refused_before_jax_loads():
    code = ("import sys\nfrom experiments import run\n"
            "try:\n    run.main(['--lr', '-1', '--workdir', 'never-made'])\n"
            "except SystemExit as exit:\n    assert exit.code == 2, exit.code\n"
            "assert 'jax' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lr must be > 0" in proc.stderr and not (ROOT / "never-made").exists()


@pytest.mark.parametrize("root", ["lightcl_jax", "experiments", "benchmarks"])
def test_modules_and_functions_stay_small(root):
    too_long = []
    for path in sorted((ROOT / root).rglob("*.py")):
        source = path.read_text()
        lines = len(source.splitlines())
        if root == "lightcl_jax" and lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                    f"{length} lines")
    assert too_long == []
