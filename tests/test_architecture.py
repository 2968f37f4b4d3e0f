"""The layout shows the design and keeps it: no import cycle among the package's modules (imports inside
functions count too), the store imports nothing from either stage, stage one nothing from stage two, and
one place creates, locks and opens a store for writing."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cachefeat"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every cachefeat module `name` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "cachefeat"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cachefeat":
                continue
            # `from pkg import mod` imports the module; `from pkg import name` the package
            subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
            out |= subs or {target}
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_walker_sees_cycles_and_function_level_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph()
    assert "cachefeat.store.verify" in graph["cachefeat.store.writer"]
    assert "cachefeat.train.online" in graph["cachefeat.train.loop"]      # imported inside build_adapter


def test_no_import_cycle_among_the_modules():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_layers_import_downwards_only():
    graph = _graph()

    def reached(prefix):
        return {(m, n) for m, ns in graph.items() if m.startswith(prefix) for n in ns}

    stages = ("cachefeat.extract", "cachefeat.train", "cachefeat.adapters", "cachefeat.cli", "cachefeat.recipes")
    assert {(m, n) for m, n in reached("cachefeat.store") if n.startswith(stages)} == set()
    upwards = ("cachefeat.train", "cachefeat.cli")
    assert {(m, n) for m, n in reached("cachefeat.extract") if n.startswith(upwards)} == set()
    assert {(m, n) for m, n in reached("cachefeat.adapters") if n.startswith(stages[:2] + stages[3:])} == set()


def test_one_place_creates_locks_and_opens_a_store_for_writing():
    """Single-process and Ray extraction both go through store.writer.open_for_writing; nothing else creates
    a store or takes its lock (import, which builds a store from an HDF5 file, holds the lock too)."""
    users = {}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if called in ("create_store", "StoreLock", "open_for_writing"):
                    users.setdefault(called, set()).add(name)
    assert users["create_store"] == {"cachefeat.store.writer"}
    assert users["open_for_writing"] == {"cachefeat.extract.pipeline", "cachefeat.extract.distributed"}
    # the reader only asks who holds the lock (Cache.being_written_by), never takes it
    assert users["StoreLock"] <= {"cachefeat.store.writer", "cachefeat.store.exchange", "cachefeat.store.reader"}
