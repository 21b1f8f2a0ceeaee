"""The layerroute package's import graph has no cycle (issue 25), and its parts import only downwards (issue 37).

Every module is parsed with `ast`, and every `import` / `from ... import` counts wherever it sits: at module level,
inside a function, under `if`: moving an import into a function hides a cycle from Python, it does not remove it.
Relative imports are resolved against the importing module. Importing `layerroute.data.x` from outside the `data`
package also runs `layerroute/data/__init__.py`, so that counts as an edge to `layerroute.data` too (a module inside
a package importing a sibling does not: its package's `__init__` is already running). No model, no torch: a few
milliseconds. Run as a script to print the whole graph's cycles: `python tests/test_import_graph.py`.

The parts and their allowed arrows (`PARTS`, `MAY_IMPORT`) are the ones docs/architecture.md draws: a module of one
part may import modules of its own part and of the parts listed for it, nothing else.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "layerroute"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is named by its __init__.py)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return name in mods and mods[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom, mods: dict[str, Path]) -> str:
    """The absolute name a `from X import` refers to (level 1 = the importing module's own package)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, mods):
        base = base[:-1]  # a plain module's `.` is its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, name: str, mods: dict[str, Path]) -> set[str]:
    """The package modules that importing `name` runs, seen from `module`: the module itself and each parent
    package (its `__init__`) that is not an ancestor of `module`."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return set()
    own = module.split(".") if _is_package(module, mods) else module.split(".")[:-1]
    out = set()
    for i in range(2, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix not in mods:
            break
        if i <= len(own) and parts[:i] == own[:i]:
            continue  # an ancestor package of the importer: its __init__ is already running
        out.add(prefix)
    return out - {module}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges[module] |= _targets(module, alias.name, mods)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node, mods)
                edges[module] |= _targets(module, base, mods)
                for alias in node.names:  # `from layerroute import model` imports the submodule
                    if f"{base}.{alias.name}" in mods:
                        edges[module] |= _targets(module, f"{base}.{alias.name}", mods)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (or a module importing itself), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def a_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the component's first module (breadth-first), closed: [a, b, ..., a]."""
    start, inside = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def describe(edges: dict[str, set[str]]) -> str:
    lines = []
    for comp in strongly_connected(edges):
        lines.append(f"cycle among {len(comp)} modules: {', '.join(comp)}")
        lines.append("  e.g. " + " -> ".join(a_cycle(edges, comp)))
        inside = [f"{a} -> {b}" for a in comp for b in sorted(edges[a] & set(comp))]
        lines.append("  its imports: " + "; ".join(inside))
    return "\n".join(lines)


def test_every_module_is_seen():
    edges = graph()
    assert "layerroute.model" in edges and "layerroute.data.build" in edges
    assert "layerroute.config" in edges["layerroute.model"]  # module level
    assert {"layerroute.data", "layerroute.data.toolcalls"} <= edges["layerroute.infer.constrain"]  # a package's __init__
    assert "layerroute.data.render" in edges["layerroute.data.collate"]  # a sibling inside the package
    assert "layerroute.data" not in edges["layerroute.data.collate"]  # its own package: already running


def test_resolves_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nfrom . import d\n")
    (pkg / "sub" / "d.py").write_text("")
    edges = graph(tmp_path)
    assert edges[f"{PACKAGE}.a"] == {f"{PACKAGE}.b"}
    assert edges[f"{PACKAGE}.b"] == {f"{PACKAGE}.a"}
    assert edges[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.c"}
    assert edges[f"{PACKAGE}.sub.c"] == {f"{PACKAGE}.a", f"{PACKAGE}.sub.d"}
    assert strongly_connected(edges) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"]]
    assert a_cycle(edges, [f"{PACKAGE}.a", f"{PACKAGE}.b"]) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]


def test_no_import_cycle():
    edges = graph()
    cycles = describe(edges)
    assert not cycles, "import cycles (imports inside functions count):\n" + cycles


# -- layering (issue 37) ---------------------------------------------------------------------------------------

#: part -> the modules (dotted prefixes) that belong to it; a module belongs to the part of its longest prefix.
PARTS = {
    "foundation": ["layerroute", "layerroute.errors", "layerroute.atomic", "layerroute.identity",
                   "layerroute.special_tokens", "layerroute.chat_template", "layerroute.flops"],
    "config": ["layerroute.config"],
    "nn": ["layerroute.nn"],
    "files": ["layerroute.packaged", "layerroute.tokenizer"],  # where a model's files and tokenizer come from
    "loading": ["layerroute.model", "layerroute.adapters"],  # model loading: the base, LoRA, the adapter directory
    "data": ["layerroute.data", "layerroute.tasks"],
    "calibrate": ["layerroute.calibrate"],
    "train": ["layerroute.train"],
    "infer": ["layerroute.infer"],
    "eval": ["layerroute.eval"],
    "serve": ["layerroute.serve"],
    "cli": ["layerroute.cli"],
}

#: part -> the other parts it may import (its own part is always allowed).
MAY_IMPORT = {
    "foundation": set(),
    "config": {"foundation", "data"},  # RunConfig holds the data section (layerroute.data.config)
    "nn": {"foundation"},
    "files": {"foundation"},
    "loading": {"foundation", "config", "nn", "files"},
    "data": {"foundation", "config", "files"},  # the tokenizer, never the model
    "calibrate": {"foundation", "config", "nn", "files", "loading", "data"},  # its own forwards: no eval, no train
    "train": {"foundation", "config", "nn", "files", "loading", "data", "calibrate"},
    "infer": {"foundation", "config", "nn", "files", "loading", "data"},
    "eval": {"foundation", "config", "nn", "files", "loading", "data", "calibrate", "infer"},
    "serve": {"foundation", "config", "nn", "files", "loading", "data", "infer"},
    "cli": set(PARTS) - {"cli"},
}

MAX_TOP_LEVEL = 12  # modules directly under layerroute/ (its __init__ included)


def part_of(module: str) -> str | None:
    best, found = -1, None
    for part, prefixes in PARTS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), part
    return found


def forbidden_edges(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a in sorted(edges):
        pa = part_of(a)
        for b in sorted(edges[a]):
            pb = part_of(b)
            if pa != pb and pb not in MAY_IMPORT[pa]:
                bad.append(f"{a} ({pa}) -> {b} ({pb})")
    return bad


def test_every_module_belongs_to_a_part():
    unplaced = [m for m in graph() if part_of(m) in (None, "foundation") and m.count(".") > 1]
    assert not unplaced, f"modules in a package no part names (add the package to PARTS): {unplaced}"


def test_parts_import_only_what_their_arrows_allow():
    bad = forbidden_edges(graph())
    assert not bad, "imports against the layering (tests/test_import_graph.py MAY_IMPORT, docs/architecture.md):\n" \
        + "\n".join(bad)


def test_the_issues_layering_rules():
    """Issue 37's rules, spelled out: NN imports neither data nor model loading; data does not import model loading;
    calibration does not import eval; serve, infer and eval do not import train."""
    edges = graph()

    def imports(part: str, other: str) -> list[str]:
        return [f"{a} -> {b}" for a in edges if part_of(a) == part for b in edges[a] if part_of(b) == other]

    for part, other in [("nn", "data"), ("nn", "loading"), ("nn", "files"), ("data", "loading"),
                        ("calibrate", "eval"), ("calibrate", "train"), ("serve", "train"), ("infer", "train"),
                        ("eval", "train")]:
        assert not imports(part, other), f"{part} imports {other}: {imports(part, other)}"


def test_the_layering_check_sees_a_forbidden_arrow():
    edges = {"layerroute.nn.x": {"layerroute.data.y"}, "layerroute.data.y": set(),
             "layerroute.eval.z": {"layerroute.nn.x"}}
    assert forbidden_edges(edges) == ["layerroute.nn.x (nn) -> layerroute.data.y (data)"]


def test_architecture_page_states_the_same_arrows():
    """docs/architecture.md's table (part | modules | may import) says what MAY_IMPORT says."""
    import re

    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in PARTS:
            allowed = re.sub(r"\([^)]*\)", "", cells[2])
            rows[cells[0]] = set(PARTS) - {cells[0]} if "every part" in allowed else (
                set() if allowed.strip() == "nothing" else {w.strip() for w in allowed.split(",")})
    assert rows == MAY_IMPORT


def private_imports(root: Path = ROOT) -> list[str]:
    """`from X import _y` where X lies in another package than the importer (a package's own modules may share
    private names; other packages ask for public ones)."""
    mods = modules(root)
    out = []
    for module, path in mods.items():
        own = module if _is_package(module, mods) else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _resolve(module, node, mods)
            if not base.startswith(PACKAGE):
                continue
            package = base if _is_package(base, mods) else base.rsplit(".", 1)[0]
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and package != own:
                    out.append(f"{module} imports {base}.{alias.name}")
    return out


def test_no_private_name_is_imported_across_packages():
    bad = private_imports()
    assert not bad, "private names imported from another package (make them public or ask a public function):\n" \
        + "\n".join(bad)


def test_the_private_import_check_sees_one(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("_p = 1\n")
    (pkg / "a" / "y.py").write_text("from .x import _p\n")  # same package: allowed
    (pkg / "b.py").write_text("from .a.x import _p\n")
    assert private_imports(tmp_path) == [f"{PACKAGE}.b imports {PACKAGE}.a.x._p"]


def test_data_and_tasks_meet_only_at_the_registry():
    """Issue 37, tasks as objects: the data pipeline asks the task registry (`layerroute.tasks.registry`) and
    imports no task module by name; neither side imports a private name of the other."""
    edges = graph()
    allowed = {"layerroute.tasks", "layerroute.tasks.registry"}
    by_name = [f"{a} -> {b}" for a in sorted(edges) if a.startswith("layerroute.data")
               for b in sorted(edges[a]) if b.startswith("layerroute.tasks") and b not in allowed]
    assert not by_name, f"data imports a task module instead of asking the registry: {by_name}"
    assert "layerroute.tasks.registry" in edges["layerroute.data.sources"]
    crossing = [line for line in private_imports() for a, b in (("data", "tasks"), ("tasks", "data"))
                if line.startswith(f"layerroute.{a}") and f" imports layerroute.{b}" in line]
    assert not crossing, f"private names between data and tasks: {crossing}"


def test_at_most_twelve_top_level_modules():
    top = sorted(p.name for p in (ROOT / PACKAGE).glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules directly under layerroute/ (at most {MAX_TOP_LEVEL}): {top}"


MAX_MODULE_LINES = 500  # issue 37: each room stays small enough to read in one sitting


def test_no_module_over_five_hundred_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


if __name__ == "__main__":
    report = describe(graph())
    print(report or "no import cycle")
    sys.exit(1 if report else 0)
