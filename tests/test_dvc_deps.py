"""Every DVC stage lists as deps every project file its command imports, and no other.

The closure logic lives in ``scripts/stage_deps.py``: for each stage of ``dvc.yaml`` and
``experiments/dvc.yaml`` (resolved by DVC itself, so ``foreach`` and ``${...}`` are expanded as
``dvc repro`` sees them), the transitive closure of the project modules imported by the
stage's ``python -m MODULE`` (every ``import`` in the source, including those inside
functions, and the packages' ``__init__.py``) must be covered by the stage's deps (a file, or a
folder holding it), and ``--check`` finds the generated code deps in place, nothing missing
and nothing stale. Planted drift shows both checks can fail, and ``--write`` mends it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "stage_deps.py"

_spec = importlib.util.spec_from_file_location("stage_deps", SCRIPT)
stage_deps = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses
_spec.loader.exec_module(stage_deps)


@pytest.fixture
def project(tmp_path):
    """A copy of what DVC and the closure read: the code, params and the dvc.yaml files."""
    proj = tmp_path / "proj"
    for rel in ("rlfn", "pipeline", "params.yaml", "dvc.yaml", "experiments", ".dvc/config"):
        src, dst = ROOT / rel, proj / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    return proj


def test_every_stage_command_runs_python_m():
    """The check reads module imports: a stage whose command is not `python -m` would slip."""
    found = stage_deps.stages(ROOT)
    assert len(found) >= 10, found  # 9 default stages (3 training) + tune + ablate
    for st in found:
        assert stage_deps.command_module(st.cmd), \
            f"{st.addressing}: command {st.cmd!r} is not `python -m MODULE`"


def test_every_stage_lists_every_project_file_it_imports():
    missing = stage_deps.missing_deps(ROOT)
    assert not missing, "stages missing deps on files they import:\n" + "\n".join(
        f"  {s}: {', '.join(f)}" for s, f in missing.items())


def test_closure_follows_imports_inside_functions_and_packages():
    files = stage_deps.import_closure(ROOT, "pipeline.train")
    for f in ("pipeline/__init__.py", "pipeline/train.py", "pipeline/entry.py",
              "pipeline/tracking.py", "pipeline/dvcops.py", "pipeline/tags.py",
              "rlfn/__init__.py", "rlfn/train/__init__.py", "rlfn/train/engine.py",
              "rlfn/engine.py", "rlfn/errors.py"):
        assert Path(f) in files, f
    # pipeline/train.py imports the registry package inside a task function
    assert any(str(f).startswith("pipeline/mlflow_registry/") for f in files)


def test_generated_deps_add_read_files_and_use_a_folder_only_when_exact():
    train = stage_deps.code_deps(ROOT, "pipeline.train")
    promote = stage_deps.code_deps(ROOT, "pipeline.promote")
    # rlfn/bicubic_native.py compiles the C file beside it: read, not imported
    assert "rlfn/_bicubic.c" in train and "rlfn/_bicubic.c" in promote
    # training imports every file of rlfn/train; promote only its config
    assert "rlfn/train" in train and not any(p.startswith("rlfn/train/") for p in train)
    assert {"rlfn/train/__init__.py", "rlfn/train/config.py"} <= set(promote)
    assert "rlfn/train" not in promote
    # the registry package: imported, and model_code.py read by pyfunc.py (models from code)
    assert "pipeline/mlflow_registry" in train


# What only inference needs: the ONNX/OpenVINO/int8 backends, the exporter, the quantizer, and
# the registry and compatibility modules that import them all.
INFERENCE_ONLY = re.compile(r"^rlfn/(backends(/|$)|infer\.py$)|onnx|openvino|export|int8|quant")


def test_training_stages_depend_on_no_inference_backend():
    """Training validates with the eager engine of rlfn/engine.py: editing the ONNX, OpenVINO,
    export or int8 code must not rerun a training stage (each train_stage@K's deps, as DVC
    reads them, and the generated closure behind them)."""
    train = [st for st in stage_deps.stages(ROOT) if st.group == "train_stage"]
    assert len(train) == 3, [st.addressing for st in stage_deps.stages(ROOT)]
    for st in train:
        bad = [d.as_posix() for d in st.deps if INFERENCE_ONLY.search(d.as_posix())]
        assert not bad, f"{st.addressing} depends on inference-only code: {bad}"
    bad = [p for p in stage_deps.code_deps(ROOT, "pipeline.train") if INFERENCE_ONLY.search(p)]
    assert not bad, f"python -m pipeline.train imports inference-only code: {bad}"


def test_check_passes_on_the_real_tree():
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(120)
def test_a_planted_missing_dep_is_found(project):
    assert stage_deps.missing_deps(project) == {}
    dvc_yaml = project / "dvc.yaml"
    text, n = re.subn(r"(?m)^ *- rlfn/engine\.py\n", "", dvc_yaml.read_text(), count=1)
    assert n == 1
    dvc_yaml.write_text(text)  # the first stage that lists it: the training stages' template
    missing = stage_deps.missing_deps(project)
    assert sorted(name.rsplit(":", 1)[-1] for name in missing) == [
        "train_stage@1", "train_stage@2", "train_stage@3"], missing
    assert all(files == ["rlfn/engine.py"] for files in missing.values()), missing


@pytest.mark.timeout(120)
def test_check_names_planted_drift_and_write_mends_it(project, capsys):
    dvc_yaml = project / "dvc.yaml"
    original = dvc_yaml.read_text()
    # a dep removed (from the training stages' template) and a stale one added to evaluate
    text, n = re.subn(r"(?m)^ *- rlfn/engine\.py\n", "", original, count=1)
    text, m = re.subn(r"(?m)^(  evaluate:\n(?:    .*\n)*?(?P<i> *)- pipeline/evaluate\.py\n)",
                      r"\g<1>\g<i>- rlfn/cli.py\n", text, count=1)
    assert n == m == 1
    dvc_yaml.write_text(text)

    assert stage_deps.main(["--check", "--root", str(project)]) == 1
    out = capsys.readouterr().out
    assert dvc_yaml.read_text() == text  # --check writes nothing
    lines = sorted(out.splitlines())
    assert lines == [
        "dvc.yaml:evaluate: no longer imported rlfn/cli.py;",
        "dvc.yaml:train_stage@1: missing rlfn/engine.py;",
        "dvc.yaml:train_stage@2: missing rlfn/engine.py;",
        "dvc.yaml:train_stage@3: missing rlfn/engine.py;",
    ], out

    assert stage_deps.main(["--write", "--root", str(project)]) == 0
    assert dvc_yaml.read_text() == original  # everything else kept byte for byte
    capsys.readouterr()
    assert stage_deps.main(["--check", "--root", str(project)]) == 0
