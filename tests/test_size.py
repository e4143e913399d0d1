"""Every module and function stays readable in one sitting: no module over 400 lines, no function over 60 lines of
code (its docstring not counted), unless the docstring says why it is kept whole ("Kept whole: ...")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_lightning"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
EXEMPTION = "Kept whole:"


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the function's first statement after its docstring to its end (decorators and signature out)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def long_functions(source: str) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = code_lines(node)
            if lines > MAX_FUNCTION_LINES and EXEMPTION not in (ast.get_docstring(node) or ""):
                found.append((node.name, lines))
    return found


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_60_lines_of_code():
    long = {
        str(p.relative_to(PACKAGE)): found for p in PACKAGE.rglob("*.py") if (found := long_functions(p.read_text()))
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code, without a 'Kept whole:' reason: {long}"


def test_the_count_skips_the_docstring_and_honours_a_stated_reason():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f'def f():\n    """Doc."""\n{body}\n') == [("f", 61)]
    assert long_functions(f'def f():\n    """Doc\n\n    more doc\n    """\n{body[: body.rindex(chr(10))]}\n') == []
    assert long_functions(f'def f():\n    """Kept whole: one table, row by row."""\n{body}\n') == []
