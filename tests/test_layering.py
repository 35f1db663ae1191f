"""The layering of the two packages: ``rlfn`` (the library) never imports the orchestration layer
(Prefect, DVC, MLflow, nor ``pipeline/`` itself), knows no project layout, and ``import rlfn``
alone stays light.

* Every ``import`` / ``from ... import`` statement in every ``rlfn/`` source, at any depth
  (inside functions too), and every ``importlib.import_module("...")`` / ``__import__("...")``
  of a constant name, is read from the AST: none may name a forbidden package, except the one
  documented entry ``ALLOWED`` (``rlfn lineage``'s report is ``pipeline.lineage``'s, imported
  only when that command runs). A planted in-function import shows the check fails.
* Importing every module in a fresh interpreter (so nothing this test process has imported
  counts) leaves none of them in ``sys.modules``.
* No ``rlfn/`` line (code, comments and docstrings alike) names the project's folders: the
  literals ``data/`` and ``../shared``, or the checkout above the package
  (``Path(__file__)...parents``)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "dvc", "mlflow", "pipeline")
# (file, enclosing function, module): the library's one import of the orchestration layer,
# `rlfn lineage`'s lazy entry into pipeline.lineage (README, Architecture).
ALLOWED = {("rlfn/cli.py", "cmd_lineage", "pipeline.lineage")}


def _sources(pkg: Path) -> list[Path]:
    return sorted(f for f in pkg.rglob("*.py") if "__pycache__" not in f.parts)


class _Imports(ast.NodeVisitor):
    """Every module a source imports, with its line and enclosing function (``<module>`` at
    the top level): statements at any depth, and dynamic imports of constant names."""

    def __init__(self):
        self.found: list[tuple[int, str, str]] = []
        self._scope = ["<module>"]

    def _function(self, node):
        self._scope.append(node.name)
        self.generic_visit(node)
        self._scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def _add(self, node, module: str) -> None:
        self.found.append((node.lineno, self._scope[-1], module))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node):
        if node.level == 0 and node.module:  # relative imports stay inside rlfn
            self._add(node, node.module)

    def visit_Call(self, node):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if (name in ("import_module", "__import__") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            self._add(node, node.args[0].value)
        self.generic_visit(node)


def forbidden_imports(pkg: Path) -> list[tuple[str, int, str, str]]:
    """(file relative to the package's parent, line, function, module) of every import of a
    FORBIDDEN package in the sources under ``pkg``, the ALLOWED one included."""
    out = []
    for f in _sources(pkg):
        v = _Imports()
        v.visit(ast.parse(f.read_text(), str(f)))
        rel = f.relative_to(pkg.parent).as_posix()
        out += [(rel, line, func, mod) for line, func, mod in v.found
                if mod.split(".")[0] in FORBIDDEN]
    return out


def _not_allowed(found: list[tuple[str, int, str, str]]) -> list[str]:
    return [f"{rel}:{line} in {func}: imports {mod}" for rel, line, func, mod in found
            if (rel, func, mod) not in ALLOWED]


def test_no_rlfn_source_imports_the_orchestration_layer_anywhere():
    """The AST of every rlfn/ source: imports inside functions count as much as top-level ones
    (the import walk below cannot see them: a function's import runs only when it is called)."""
    found = forbidden_imports(ROOT / "rlfn")
    bad = _not_allowed(found)
    assert not bad, "rlfn imports the orchestration layer:\n  " + "\n  ".join(bad)
    # the one allowed entry is really there (an allowance for nothing would hide a move)
    assert {(rel, func, mod) for rel, _, func, mod in found} == ALLOWED


def _plant(tmp_path: Path, rel: str, function: str, statement: str) -> tuple[Path, int]:
    """A copy of rlfn with ``statement`` as the first statement of ``function`` in ``rel``
    (after its docstring); returns the copy and the planted line."""
    pkg = tmp_path / "rlfn"
    shutil.copytree(ROOT / "rlfn", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = pkg.parent / rel
    lines = target.read_text().splitlines(keepends=True)
    fn = next(n for n in ast.walk(ast.parse("".join(lines)))
              if isinstance(n, ast.FunctionDef) and n.name == function)
    first = fn.body[1] if ast.get_docstring(fn) is not None else fn.body[0]
    lines.insert(first.lineno - 1, " " * first.col_offset + statement + "\n")
    target.write_text("".join(lines))
    return pkg, first.lineno


@pytest.mark.parametrize("rel, function, statement, module", [
    ("rlfn/backends/int8.py", "cpu_has_int8_dot", "import mlflow", "mlflow"),
    ("rlfn/backends/__init__.py", "make_engine", "from prefect import flow", "prefect"),
    # the allowance is for one function: the same import elsewhere in cli.py is refused
    ("rlfn/cli.py", "cmd_profile", "from pipeline.lineage import format_report",
     "pipeline.lineage"),
    ("rlfn/cli.py", "cmd_train", "importlib.import_module('dvc.repo')", "dvc.repo"),
])
def test_the_check_finds_a_planted_import_inside_a_function(tmp_path, rel, function,
                                                             statement, module):
    pkg, line = _plant(tmp_path, rel, function, statement)
    assert _not_allowed(forbidden_imports(pkg)) == [f"{rel}:{line} in {function}: imports "
                                                    f"{module}"]


LAYOUT = [
    (re.compile(r"(?<![\w])(?<!rlfn/)data/"), "the literal data/ (a project folder)"),
    (re.compile(r"\.\./shared"), "the literal ../shared (the reference data beside the checkout)"),
    (re.compile(r"__file__.*\.(parents\b|parent\.parent)"), "the checkout above the package"),
]


def layout_literals(pkg: Path) -> list[str]:
    """``file:line: what: text`` for every line under ``pkg`` naming the project's layout
    (every line: code, comments and docstrings)."""
    out = []
    for f in _sources(pkg):
        for n, text in enumerate(f.read_text().splitlines(), 1):
            for pattern, what in LAYOUT:
                if pattern.search(text):
                    out.append(f"{f.relative_to(pkg.parent).as_posix()}:{n}: {what}: "
                               f"{text.strip()}")
    return out


def test_rlfn_knows_no_project_layout():
    """The library takes every path from its caller (the pipeline's settings, a command-line
    option, an environment variable the user sets): no fallback to the project's folders."""
    found = layout_literals(ROOT / "rlfn")
    assert not found, "rlfn names the project's layout:\n  " + "\n  ".join(found)


def test_the_layout_check_finds_a_planted_literal(tmp_path):
    pkg, line = _plant(tmp_path, "rlfn/cli.py", "cmd_profile",
                       'default = Path("data/sample/train")  # a fallback')
    (pkg / "extra.py").write_text('"""Reads ../shared when present."""\n'
                                  'ROOT = Path(__file__).resolve().parents[1]\n')
    assert [x.split(": ")[0] for x in layout_literals(pkg)] == [
        f"rlfn/cli.py:{line}", "rlfn/extra.py:1", "rlfn/extra.py:2"]


def _python(code: str) -> dict:
    # cwd=ROOT: `rlfn` (and `pipeline`, were anything to import it) resolve to this checkout
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _package_modules() -> set[str]:
    """Every module of ``rlfn`` by its files (to show the walk below missed none)."""
    pkg = ROOT / "rlfn"
    out = set()
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.add(".".join(parts))
    return out


WALK = """
import importlib, json, pkgutil, sys
import rlfn
forbidden = %r
def bad():
    return {m.split(".")[0] for m in sys.modules if m.split(".")[0] in forbidden}
seen, failed, culprits = [], {}, {}
def onerror(name):
    failed[name] = repr(sys.exc_info()[1])
for m in pkgutil.walk_packages(rlfn.__path__, "rlfn.", onerror=onerror):
    seen.append(m.name)
    if m.name.rsplit(".", 1)[-1] == "__main__":  # `python -m rlfn`: runs the CLI on import
        continue
    before = bad()
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed[m.name] = repr(e)
    if bad() - before:  # the first module that brought each one in
        culprits[m.name] = sorted(bad() - before)
print(json.dumps({"seen": seen, "failed": failed, "file": rlfn.__file__,
                  "forbidden": sorted(bad()), "culprits": culprits}))
""" % (FORBIDDEN,)


def test_no_rlfn_module_imports_the_orchestration_layer():
    """Import every module of ``rlfn`` (pkgutil.walk_packages): none of Prefect, DVC, MLflow or
    ``pipeline`` may end up in sys.modules."""
    r = _python(WALK)
    assert Path(r["file"]).resolve() == ROOT / "rlfn" / "__init__.py", r["file"]
    assert not r["failed"], r["failed"]
    assert set(r["seen"]) | {"rlfn"} == _package_modules(), \
        _package_modules() ^ (set(r["seen"]) | {"rlfn"})
    assert {"rlfn.cli", "rlfn.infer", "rlfn.backends.int8", "rlfn.train.engine", "rlfn.data.manifest"} <= set(r["seen"])
    assert r["forbidden"] == [], \
        f"{r['forbidden']} imported by {r['culprits'] or '`import rlfn` itself'}"


LIGHT = """
import json, sys
import rlfn
loaded = sorted(m for m in sys.modules if m == "rlfn" or m.startswith("rlfn."))
names = {n: type(getattr(rlfn, n)).__name__ for n in rlfn.__all__}  # the API still resolves
print(json.dumps({"loaded": loaded, "names": names}))
"""


def test_import_rlfn_alone_stays_light():
    """``import rlfn`` must not pull in training, the data pipeline or the inference backends:
    they load when first used."""
    r = _python(LIGHT)
    heavy = [m for m in r["loaded"]
             if m.split(".")[:2] in (["rlfn", "train"], ["rlfn", "data"], ["rlfn", "infer"])]
    assert heavy == [], f"import rlfn loaded {heavy} (all loaded: {r['loaded']})"
    assert r["names"], "rlfn.__all__ is empty"
