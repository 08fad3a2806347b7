"""The shape of the code (docs/architecture.md): the layer contract holds, functions stay readable in one screen,
and first-party imports sit at the top of their module (an import inside a function hid three cycles once)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "pipeline", "cli")
FIRST_PARTY = {"train", "pipeline", "cli"}
#: longest body (lines after the signature and docstring) a function may have
MAX_BODY_LINES = 60
#: longest module, in lines outside its Numba kernels
MAX_MODULE_LINES = 420
#: the Numba kernels and the synthetic scene builders are long by nature (one flat loop, one scene)
EXEMPT = ("pipeline/synthetic/",)


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _functions(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return fn.end_lineno - body[0].lineno + 1


def _exempt(path: Path) -> bool:
    return str(path.relative_to(ROOT)).startswith(EXEMPT)


def test_layer_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (it is in the test extra)")
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_functions_fit_one_screen():
    long = [f"{p.relative_to(ROOT)}:{fn.name} ({_body_lines(fn)} lines)"
            for p in _sources() if not _exempt(p)
            for fn in _functions(ast.parse(p.read_text()))
            if _body_lines(fn) > MAX_BODY_LINES and not _is_kernel(fn)]
    assert not long, "split these functions: " + ", ".join(long)


def _is_kernel(fn: ast.AST) -> bool:
    """A Numba kernel (``@nb.njit``, ``@numba.njit(...)``): one flat loop over arrays, long by nature."""
    def name(d: ast.expr) -> str:
        d = d.func if isinstance(d, ast.Call) else d
        return d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "")
    return isinstance(fn, ast.FunctionDef) and any(name(d) in ("njit", "jit") for d in fn.decorator_list)


def _lines_outside_kernels(path: Path) -> int:
    tree = ast.parse(path.read_text())
    kernels = sum(fn.end_lineno - fn.lineno + 1 + len(fn.decorator_list) for fn in tree.body if _is_kernel(fn))
    return len(path.read_text().splitlines()) - kernels


def test_modules_stay_short():
    long = [f"{p.relative_to(ROOT)} ({n} lines outside Numba kernels)" for p in _sources() if not _exempt(p)
            if (n := _lines_outside_kernels(p)) > MAX_MODULE_LINES]
    assert not long, "split these modules: " + ", ".join(long)


def _deferred_imports(path: Path) -> list[str]:
    """First-party imports inside a function of ``path``."""
    found = []
    for fn in _functions(ast.parse(path.read_text())):
        for node in ast.walk(fn):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(ROOT)}:{fn.name} imports {n}" for n in names
                      if n.split(".")[0] in FIRST_PARTY]
    return found


def test_first_party_imports_are_at_module_top():
    deferred = [line for p in _sources() for line in _deferred_imports(p)]
    assert not deferred, "move to the module's top (an import inside a function hides a cycle): " + ", ".join(deferred)
