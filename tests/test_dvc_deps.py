"""Every DVC stage lists as deps every project file its command imports.

For each stage of ``dvc.yaml`` and ``experiments/dvc.yaml`` (resolved by DVC itself, so
``foreach`` and ``${...}`` are expanded as ``dvc repro`` sees them), the transitive closure
of the project modules imported by the stage's ``python -m MODULE`` (every ``import`` in
the source, including those inside functions, and the packages' ``__init__.py``) must be
covered by the stage's deps (a file, or a folder holding it). A test that plants a missing
dep shows the check can fail.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlfn", "pipeline")


def _module_file(root: Path, name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(root: Path, name: str, path: Path) -> set[str]:
    """Project modules ``name`` (at ``path``) imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def add(mod: str) -> None:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/ and a/b/ __init__ too
            if _module_file(root, ".".join(parts[:i])):
                found.add(".".join(parts[:i]))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            add(mod)
            for a in node.names:  # `from pkg import submodule`
                if _module_file(root, f"{mod}.{a.name}"):
                    add(f"{mod}.{a.name}")
    return found


def import_closure(root: Path, module: str) -> set[Path]:
    """Files of every project module that running ``python -m module`` imports."""
    start = [module]
    if (root.joinpath(*module.split(".")) / "__main__.py").is_file():
        start.append(f"{module}.__main__")
    todo, seen = [], set()
    for m in start:
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    files: set[Path] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        f = _module_file(root, m) or (root.joinpath(*m.split(".")).with_suffix(".py")
                                      if m.endswith("__main__") else None)
        if f is None or not f.is_file():
            continue
        files.add(f.relative_to(root))
        todo += sorted(_imports(root, m, f) - seen)
    return files


def _command_module(cmd: str) -> str | None:
    words = shlex.split(cmd)
    for i, w in enumerate(words[:-1]):
        if w == "-m":
            return words[i + 1]
    return None


def stages(root: Path) -> list[tuple[str, str, list[Path]]]:
    """(name, cmd, deps relative to root) of every stage DVC finds in ``root``."""
    from dvc.repo import Repo

    out = []
    with Repo(str(root)) as repo:
        for st in repo.index.stages:
            if not st.cmd:
                continue
            deps = [Path(d.fs_path).resolve().relative_to(root.resolve()) for d in st.deps]
            cmd = st.cmd if isinstance(st.cmd, str) else " && ".join(st.cmd)
            out.append((st.addressing, cmd, deps))
    return out


def missing_deps(root: Path) -> dict[str, list[str]]:
    """{stage: [imported project files not covered by its deps]} (stages with none left out)."""
    out = {}
    for name, cmd, deps in stages(root):
        module = _command_module(cmd)
        if module is None:
            continue
        need = import_closure(root, module)
        missing = sorted(str(f) for f in need
                         if not any(f == d or d in f.parents for d in deps))
        if missing:
            out[name] = missing
    return out


def test_every_stage_command_runs_python_m():
    """The check reads module imports: a stage whose command is not `python -m` would slip."""
    found = stages(ROOT)
    assert len(found) >= 10, found  # 9 default stages (3 training) + tune + ablate
    for name, cmd, _ in found:
        assert _command_module(cmd), f"{name}: command {cmd!r} is not `python -m MODULE`"


def test_every_stage_lists_every_project_file_it_imports():
    missing = missing_deps(ROOT)
    assert not missing, "stages missing deps on files they import:\n" + "\n".join(
        f"  {s}: {', '.join(f)}" for s, f in missing.items())


def test_closure_follows_imports_inside_functions_and_packages():
    files = import_closure(ROOT, "pipeline.train")
    for f in ("pipeline/__init__.py", "pipeline/train.py", "pipeline/_common.py",
              "rlfn/__init__.py", "rlfn/train/__init__.py", "rlfn/train/engine.py",
              "rlfn/infer.py", "rlfn/errors.py"):
        assert Path(f) in files, f
    # pipeline/train.py imports the registry package inside a task function
    assert any(str(f).startswith("pipeline/mlflow_registry/") for f in files)


@pytest.mark.timeout(120)
def test_a_planted_missing_dep_is_found(tmp_path):
    proj = tmp_path / "proj"
    for rel in ("rlfn", "pipeline", "params.yaml", "dvc.yaml", "experiments", ".dvc/config",
                "data/sample"):
        src, dst = ROOT / rel, proj / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    assert missing_deps(proj) == {}
    dvc_yaml = proj / "dvc.yaml"
    text, n = re.subn(r"(?m)^ *- rlfn/infer\.py\n", "", dvc_yaml.read_text(), count=1)
    assert n == 1
    dvc_yaml.write_text(text)  # the first stage that lists it: the training stages' template
    missing = missing_deps(proj)
    assert sorted(name.rsplit(":", 1)[-1] for name in missing) == [
        "train_stage@1", "train_stage@2", "train_stage@3"], missing
    assert all(files == ["rlfn/infer.py"] for files in missing.values()), missing
