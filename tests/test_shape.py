"""The shape of the source: no function of truthmap longer than MAX_FUNCTION_LINES (the project's guide: short
functions, never over 80 lines)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "truthmap"
MAX_FUNCTION_LINES = 80


def long_functions(source: str, where: str = "", limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'where:line name (n lines)' for each function or method, nested ones included, longer than limit lines
    (from its `def` or first decorator to its last line, docstring and comments included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > limit:
                found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += long_functions(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).as_posix())
    assert found == []


def test_a_long_function_is_found_with_its_decorators_and_nested_functions():
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    source = f"@decorator\ndef fits():\n{body}\n\ndef outer():\n    def inner():\n{body.replace('    ', '        ')}"
    # fits: decorator, def and 79 lines = 81 (lines 1-81); outer: its def, inner's def and 79 = 81; inner: 80
    assert long_functions(source, "m.py") == ["m.py:2 fits (81 lines)", "m.py:84 outer (81 lines)"]
    assert long_functions(source, "m.py", limit=79) == [
        "m.py:2 fits (81 lines)", "m.py:84 outer (81 lines)", "m.py:85 inner (80 lines)"]
