"""Structure checks that CI runs before the tests (``python .ci/check_layout.py``; exit 1 on a problem).

* Data flows one way: ``data`` → ``privacy`` → ``federation`` (``models`` beside ``data``). No module
  of a lower floor imports a higher one, at module level or inside a function.
* No import of a ``carbonfed`` module inside a function of the package, except in the command dispatcher
  (``federation/cli.py``), which imports a subcommand only when it runs: a function-level import
  must never be the way around an import cycle.
* No file over 400 lines, no function over 80 lines (product code, tests and bench scripts).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"data": 0, "models": 0, "privacy": 1, "federation": 2}
LAZY_OK = {"federation/cli.py"}
MAX_FILE, MAX_FUNC = 400, 80
SCANNED = ("data", "models", "privacy", "federation", "tests", "bench", ".ci")


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    return []


def _floor_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "carbonfed" and len(parts) > 1:
        parts = parts[1:]
    elif parts[0] in FLOORS:   # the old top-level names: not importable any more, flag them too
        return parts[0]
    else:
        return None
    return parts[0] if parts[0] in FLOORS else None


def check_file(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    src = path.read_text()
    problems = []
    lines = src.count("\n") + (not src.endswith("\n"))
    if lines > MAX_FILE:
        problems.append(f"{rel}: {lines} lines (more than {MAX_FILE})")
    tree = ast.parse(src, filename=rel)
    own = rel.split("/")[0]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNC:
                problems.append(f"{rel}:{node.lineno}: function {node.name} has {n} lines (more than {MAX_FUNC})")
            if rel not in LAZY_OK and own in FLOORS:
                for inner in ast.walk(node):
                    for mod in _imported(inner):
                        if mod.startswith("carbonfed.") or _floor_of(mod):
                            problems.append(f"{rel}:{inner.lineno}: import of {mod} inside {node.name}()")
        for mod in _imported(node):
            floor = _floor_of(mod)
            if floor and not mod.startswith("carbonfed"):
                problems.append(f"{rel}:{node.lineno}: import {mod}: use the carbonfed.{floor} name")
            if own in FLOORS and floor and FLOORS[floor] > FLOORS[own]:
                problems.append(f"{rel}:{node.lineno}: {own}/ imports {mod}: a lower floor importing a higher one")
    return problems


def main() -> int:
    problems = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                problems += check_file(path)
    for p in problems:
        print(p)
    print(f"layout: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
