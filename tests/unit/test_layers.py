"""The package's layers (docs/architecture.md): every import in cudabuild/, at any depth of a
function, goes to the same layer or one below, and no chain of imports comes back to where it
started. Read from the source with `ast`, so that a new import that runs back up fails here."""

import ast
from pathlib import Path

import cudabuild

PACKAGE = Path(cudabuild.__file__).parent

# Bottom first. A name is a module (cudabuild.nvidia) or a package (cudabuild.host: all of it).
LAYERS = [
    ["cudabuild", "cudabuild.errors", "cudabuild.ui", "cudabuild.lazy", "cudabuild.digests", "cudabuild.resources"],
    ["cudabuild.nvidia"],
    ["cudabuild.options"],
    ["cudabuild.store", "cudabuild.verify", "cudabuild.signing"],
    ["cudabuild.artifact"],
    ["cudabuild.engine", "cudabuild.registry", "cudabuild.host", "cudabuild.inspection"],
    ["cudabuild.settings"],
    ["cudabuild.sources", "cudabuild.boottest"],
    ["cudabuild.compile"],
    ["cudabuild.install", "cudabuild.cdi"],
    ["cudabuild.node"],
    ["cudabuild.bake", "cudabuild.deploy", "cudabuild.fleet"],
    ["cudabuild.cli", "cudabuild.__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the cudabuild modules it imports (a name imported from a package that is one of
    its modules counts as that module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def layer_of(module: str) -> int:
    best = None
    for rank, names in enumerate(LAYERS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + ".") and prefix != "cudabuild":
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best[0]


def test_every_module_has_a_layer():
    for module in imports():
        layer_of(module)


def test_no_import_runs_up_a_layer():
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in imports().items() for b in targets if layer_of(b) > layer_of(a))
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = imports()
    # a package's __init__ re-exporting its own modules is the package, not a cycle through it
    graph = {a: {b for b in bs if not b.startswith(a + ".")} for a, bs in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)
