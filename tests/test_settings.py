"""params.yaml checked once into typed settings: one clear error naming the file, the key, the
value and what is allowed; a stage refuses a bad one with exit code 2 before any work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.settings import load_settings
from pipeline.stage_config import train_config
from rlfn.errors import ConfigError
from servers import clean_env

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, edit) -> Path:
    prm = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(prm)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(prm, sort_keys=False))
    return p


def test_the_project_params_load():
    s = load_settings(ROOT / "params.yaml")
    assert s.stage_keys == ["1", "2", "3"] and s.last_stage == "3"
    assert s.final_weights == Path(s.train_launch.out) / "stage3" / "model.safetensors"
    assert s.train_stages["1"].warm_start is None
    assert s.train_stages["3"].warm_start == Path(s.train_launch.out) / "stage2" / \
        "model.safetensors"
    assert s.registered_model == f"rlfn-x{s.scale}"
    c3 = train_config(s, "3")
    assert c3.contrastive and c3.stage == 3 and c3.lr == s.train["lr"]
    assert not train_config(s, "1").contrastive


def test_rlfn_train_stage_k_is_the_pipelines_stage_k(tmp_path, capsys):
    """``rlfn train --config params.yaml --stage K`` trains with exactly the values of the
    pipeline's train_stage@K (one merge: rlfn.train.config.params_stage_config); it never
    picks a stage by itself, and the older train_stage<k> layout is refused naming the key."""
    from rlfn.cli import main
    from rlfn.train.config import load_config

    s = load_settings(ROOT / "params.yaml")
    for k in s.stage_keys:
        assert load_config(ROOT / "params.yaml", stage=int(k)) == train_config(s, k), k
    # the stages differ, so a wrong merge could not pass unnoticed
    assert len({train_config(s, k).digest() for k in s.stage_keys}) == len(s.stage_keys)
    out = tmp_path / "out"
    assert main(["-q", "train", "--config", str(ROOT / "params.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --stage: ") and "say which" in err[0]
    p = _params(tmp_path, lambda prm: prm.update(train_stage3={"contrastive": True}))
    assert main(["-q", "train", "--config", str(p), "--stage", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {p}: train_stage3: the "
                                               "train_stage<k> layout is gone"), err
    assert not out.exists()


@pytest.mark.parametrize("edit, where, words", [
    (lambda p: p["profile"].update(warmup=-1), "profile.warmup",
     ["greater than or equal to 0", "-1"]),
    (lambda p: p["degrade"].update(scales=[5]), "degrade.scales.0", ["2, 3 or 4", "5"]),
    (lambda p: p["promote"].update(margin="a lot"), "promote.margin", ["number", "a lot"]),
    (lambda p: p["promote"].update(allow_uncommitted="maybe"), "promote.allow_uncommitted",
     ["valid boolean", "maybe"]),
    (lambda p: p["profile"].update(bakend="eager"), "profile.bakend", ["extra inputs"]),
    (lambda p: p.pop("evaluate"), "evaluate", ["field required"]),
    (lambda p: p["train_stages"]["2"].update(init="models/stage9/model.safetensors"),
     "train_stages", ["previous stage's weights", "models/stage1/model.safetensors"]),
    (lambda p: p["train_stages"].update({"x": {"init": "a"}}), "train_stages",
     ["stage key 'x'"]),
    (lambda p: p["train_launch"].update(nproc_per_node=0), "train_launch.nproc_per_node",
     ["greater than 0"]),
    (lambda p: p["evaluate"].update(stage_sets=["Set99"]), "evaluate.stage_sets",
     ["Set99 not in evaluate.sets"]),
    (lambda p: p["data"].update(manifest_summary="elsewhere.json"), "data.manifest_summary",
     ["data/manifest.summary.json"]),
])
def test_a_bad_value_is_one_error_naming_file_key_and_value(tmp_path, edit, where, words):
    p = _params(tmp_path, edit)
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: {where}"), msg
    for w in words:
        assert w in msg, msg
    assert ei.value.exit_code == 2 and "\n" not in msg


@pytest.mark.parametrize("edit, words", [
    (lambda p: p["train"].update(lr=-1), ["train.lr", "must be > 0", "-1"]),
    (lambda p: p["train_stages"]["3"].update(contrastive_weight=-0.5),
     ["train_stages.3", "contrastive_weight", "-0.5"]),
    (lambda p: p["train_stages"]["2"].update(batchsize=8), ["train_stages.2", "batchsize"]),
])
def test_a_bad_training_setting_names_its_section(tmp_path, edit, words):
    s = load_settings(_params(tmp_path, edit))
    with pytest.raises(ConfigError) as ei:
        for k in s.stage_keys:
            train_config(s, k)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_missing_and_broken_params_files(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("module, edit, key", [
    ("pipeline.evaluate", lambda p: p["evaluate"].update(sets={}), "evaluate.sets"),
    ("pipeline.profile", lambda p: p["profile"].update(backend="tensorrt"), "profile.backend"),
    ("pipeline.prepare", lambda p: p["data"]["sources"][0].update(kind="ftp"),
     "data.sources[0]"),
    ("pipeline.train", lambda p: p["train"].update(patch_size=30), "train.patch_size"),
])
def test_a_stage_refuses_bad_settings_with_exit_2_before_any_work(tmp_path, module, edit, key):
    proj = tmp_path / "proj"
    proj.mkdir()
    for rel in ("rlfn", "pipeline"):
        shutil.copytree(ROOT / rel, proj / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(_params(tmp_path, edit), proj / "params.yaml")
    args = ["--stage", "1"] if module == "pipeline.train" else []
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=proj, env=clean_env(),
                       capture_output=True, text=True, timeout=240)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(errors) == 1 and key in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    made = {p.name for p in proj.iterdir()}
    # nothing written: no MLflow store, no outputs, no flow run (importing Prefect makes its
    # empty home folder, nothing more)
    assert made <= {"rlfn", "pipeline", "params.yaml", ".prefect"}, made
    assert not list((proj / ".prefect").glob("*.db")), list((proj / ".prefect").iterdir())
