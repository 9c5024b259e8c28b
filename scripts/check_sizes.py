"""Module and function sizes (issue 11): every module under 400 lines, no function over 60 lines.

    python scripts/check_sizes.py [FOLDER ...]     (default: contract models service training scripts)

Prints each module or function over the limit and exits 1 when there is one. Tests are not checked.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE, MAX_FUNCTION = 400, 60
FOLDERS = ("contract", "models", "service", "training", "scripts")


def oversized(path: Path) -> list[str]:
    """``path:line: what`` for the module and each function (methods, nested ones too) over the limits."""
    text = path.read_text()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    out = []
    lines = len(text.splitlines())
    if lines >= MAX_MODULE:
        out.append(f"{rel}: module has {lines} lines (limit {MAX_MODULE - 1})")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION:
                out.append(f"{rel}:{node.lineno}: {node.name} has {n} lines (limit {MAX_FUNCTION})")
    return out


def main(argv: list[str]) -> int:
    folders = [ROOT / f for f in (argv or FOLDERS)]
    problems = [p for folder in folders for f in sorted(folder.rglob("*.py")) for p in oversized(f)]
    print("\n".join(problems) or "all modules < 400 lines, all functions <= 60 lines")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
