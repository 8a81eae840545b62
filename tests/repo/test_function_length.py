"""House rule: functions fit on a screen (~60 lines) unless their docstring says why not.

A function longer than ``MAX_LINES`` (signature, docstring and body) must state the reason in
its docstring with a sentence starting "Long because". The test lists every offender with its
file, line and length, so a failure says exactly what to split.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("omnifuse_model", "client", "server", "simulation")
MAX_LINES = 60
REASON = "Long because"


def long_functions(root: Path) -> list[str]:
    offenders = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                length = node.end_lineno - node.lineno + 1
                docstring = ast.get_docstring(node) or ""
                if length > MAX_LINES and REASON not in docstring:
                    where = path.relative_to(root)
                    offenders.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return offenders


def test_no_function_over_sixty_lines_without_a_reason() -> None:
    offenders = long_functions(ROOT)
    assert not offenders, "functions over 60 lines without a reason:\n" + "\n".join(offenders)


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    package = tmp_path / "server"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (package / "m.py").write_text(f"def too_long():\n{body}\n\n\ndef short():\n    return 1\n")
    (package / "n.py").write_text(f'def excused():\n    """{REASON} it is a table."""\n{body}\n')
    assert long_functions(tmp_path) == [f"server/m.py:1 too_long ({MAX_LINES + 1} lines)"]
