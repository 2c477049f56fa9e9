"""The layout's promises, read from the source: the modules of ``unmask`` import each other without
a circle; the samplers (``unmask.sampling``) sit below checkpoints, the command line, the server,
evaluation and the experiments: they import none of them; no function is longer than 80 lines; and
errors outside the command line name parameters, not flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import unmask

SOURCE = Path(unmask.__file__).parent
ABOVE_SAMPLING = ("unmask.checkpoint", "unmask.generation", "unmask.cli", "unmask.serve", "unmask.evaluation", "unmask.experiments")


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, for its __init__)."""
    found = {}
    for path in SOURCE.rglob("*.py"):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports, anywhere in it (functions included): ``from a.b import c``
    counts as a.b.c when that is a module, else as a.b; parent packages are not counted."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found |= {target} if target in known else {base} if base in known else set()
    return found - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_read_from_the_source():
    edges = graph()
    assert {"unmask", "unmask.sampling", "unmask.sampling.spec", "unmask.generation"} <= set(edges)
    assert "unmask.sampling.spec" in edges["unmask.sampling.decoding"]  # a plain from-import
    assert "unmask.checkpoint" in edges["unmask.generation"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    assert cycle(graph()) is None


def test_sampling_imports_nothing_above_it():
    edges = graph()
    above = {name: sorted(t for t in targets if t.startswith(ABOVE_SAMPLING))
             for name, targets in edges.items() if name == "unmask.sampling" or name.startswith("unmask.sampling.")}
    assert not {name: targets for name, targets in above.items() if targets}


def functions() -> list[tuple[int, str]]:
    """(lines, "module:line name") of every function and method in the package."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return found


def test_no_function_is_longer_than_80_lines():
    assert not sorted(f for f in functions() if f[0] > 80)


FLAG = re.compile(r"(?<![\w-])--[a-z]")


def flags_in_errors(source: str, where: str = "") -> list[str]:
    """The error texts built in ``source`` (calls of ``...Error``) that write a command-line flag."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith("Error"):
            texts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            found += [f"{where}:{node.lineno} {text!r}" for text in texts if FLAG.search(text)]
    return found


def test_library_errors_name_parameters_not_flags():
    """The library names a parameter by its name (``OptionError``); the command line spells it as a
    flag and the server as a request field (unmask.cli.spelling, unmask.serve.schemas)."""
    assert flags_in_errors('raise UnmaskError(f"--lr={lr} must be > 0")\nraise OptionError("lr", "{lr} must be > 0")') == [":1 '--lr='"]
    library = {name: path for name, path in modules().items() if not name.startswith("unmask.cli")}
    assert not [text for name, path in library.items() for text in flags_in_errors(path.read_text(encoding="utf-8"), name)]
