"""The shape of the package, read from its source (ast, nothing imported): imports flow one way (no cycle,
counting imports inside functions too), no module imports another module's _private name, and no function is
longer than a screen."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tpcompile"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def trees():
    for name, path in MODULES.items():
        yield name, path, ast.parse(path.read_text(), filename=str(path))


def resolve(name: str) -> str | None:
    """The tpcompile module an import of `name` loads (the longest prefix that is one), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, tree: ast.Module):
    """(line, imported module, names) for every import anywhere in the module, relative ones resolved."""
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base, [a.name for a in node.names]


def import_graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module, _, tree in trees():
        for _, base, names in imports(module, tree):
            # `from pkg import sub` loads the submodule pkg.sub; `from mod import name` loads mod
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES] or [base]
            for target in filter(None, map(resolve, targets)):
                if target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    colour, stack = {}, []

    def visit(m):
        colour[m] = "grey"
        stack.append(m)
        for n in sorted(graph[m]):
            if colour.get(n) == "grey":
                return stack[stack.index(n):] + [n]
            if n not in colour and (cycle := visit(n)):
                return cycle
        colour[m] = "black"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in colour and (cycle := visit(m)):
            return cycle
    return None


def test_the_checks_see_a_cycle_and_resolve_relative_and_submodule_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = import_graph()
    assert "tpcompile.passes.rules.walk" in graph["tpcompile.passes.rules.matmul"]
    assert {"tpcompile.passes.rules.matmul", "tpcompile.passes.rules.views"} <= graph["tpcompile.passes.rules"]
    assert "tpcompile.plan" in graph["tpcompile.passes"]


def test_the_import_graph_of_tpcompile_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_aliases(module: str, tree: ast.Module) -> set[str]:
    """Local names bound to a tpcompile module (`from tpcompile.runtime import worker as w`, `import tpcompile.x as y`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tpcompile"):
            names.update(a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            names.update(a.asname for a in node.names if a.asname and a.name in MODULES)
    return names


def test_no_module_imports_a_private_name_of_another_module():
    found = []
    for module, path, tree in trees():
        where = path.relative_to(PACKAGE.parent)
        for line, base, names in imports(module, tree):
            hidden = [n for n in names + base.split(".") if private(n)]
            if base.startswith("tpcompile") and hidden:
                found.append(f"{where}:{line} imports {', '.join(hidden)} from {base}")
        aliases = module_aliases(module, tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases:
                found.append(f"{where}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_no_function_is_longer_than_a_screen():
    long = []
    for _, path, tree in trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
