"""Ablations (pipeline/ablate.py, pipeline/ablation_report.py, scripts/ablations.sh): bad names
refused before any work, variant expansion, the report from a real `dvc exp show --json`
capture, and one real tiny ablation end to end (Prefect + MLflow, no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from servers import clean_env

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "ablation_exp_show.json"

from pipeline import ablate as abl  # noqa: E402
from pipeline import ablation_report as rep  # noqa: E402
from pipeline.settings import AblationSettings, load_section, load_settings  # noqa: E402


_env = clean_env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project with 4 training images, 2 Set5 images and a tiny ablation."""
    d = tmp_path_factory.mktemp("abl") / "rlfn"
    d.mkdir()
    for rel in ("rlfn", "pipeline"):
        shutil.copytree(ROOT / rel, d / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, n in (("data/sample/train", 4), ("data/sample/Set5", 2)):
        (d / rel).mkdir(parents=True)
        for f in sorted((ROOT / rel).glob("*.png"))[:n]:
            shutil.copy2(f, d / rel / f.name)
    prm = yaml.safe_load((ROOT / "params.yaml").read_text())
    prm["ablation"]["base"] = dict(iterations=4, batch_size=2, patch_size=64, lr_step=2,
                                   val_every=4, checkpoint_every=4, epoch_iterations=4,
                                   val_max_images=2, log_every=1, num_workers=0)
    prm["ablation"]["stages"] = 2
    prm["ablation"]["runtime"] = {"max_images": 1, "warmup": 1}
    prm["evaluate"]["sets"] = {"Set5": "data/sample/Set5"}  # the 2 images copied above
    (d / "params.yaml").write_text(yaml.safe_dump(prm, sort_keys=False))
    return d


def _set_name(project: Path, name: str) -> None:
    p = project / "params.yaml"
    prm = yaml.safe_load(p.read_text())
    prm["ablation"]["name"] = name
    p.write_text(yaml.safe_dump(prm, sort_keys=False))


# Measured on the 2-core reference machine: the tiny ablation ~52 s, every other test < 2 s.
# A hang guard, not a speed claim: 180 s (3.5x) timed out on that machine with the main job
# and CI's other phase beside it (load 8); 600 s is ~12x.
ABLATE_TIMEOUT_S = 600  # the tiny ablation's subprocess


def _ablate(project: Path, timeout=ABLATE_TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "pipeline.ablate"], cwd=project, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ bad input, before work
def test_unknown_name_refused_before_work(project):
    _set_name(project, "rfdb_r99")
    r = _ablate(project, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ablation.name: unknown ablation "
                                                   "'rfdb_r99'"), r.stderr
    for known in ("rfdb", "rfdb_r48", "rlfb", "ws_1", "e2000", "clr", "edsr_cl_ws"):
        assert known in lines[0]
    assert not (project / "ablations").exists() and not (project / "mlflow.db").exists()
    assert not (project / "metrics" / "ablation.json").exists()


def test_script_refuses_unknown_name_before_dvc():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "ablations.sh"), "rfdb", "nope"],
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: unknown ablation 'nope'" in r.stderr
    assert "=== ablation" not in r.stdout  # nothing ran


# ------------------------------------------------------------------ variant expansion
def test_variant_expansion():
    s = load_settings(ROOT / "params.yaml")
    prm = s.raw
    a = prm["ablation"]
    it, step, n = a["base"]["iterations"], a["base"]["lr_step"], a["stages"]
    names = abl.variant_names(s)
    for want in ("rfdb", "rfdb_r48", "rfdb_r52", "rlfb", "rlfb_no_cl", "ws_1", "e2000", "clr",
                 "edsr", "edsr_cl_ws"):
        assert want in names
    data = {"hr_dir": str(ROOT / "data/sample/train")}
    ws = abl.stage_configs(s, "rlfb", data)
    assert [c.stage for c in ws] == list(range(1, n + 1))
    assert [c.contrastive for c in ws] == [False] * (n - 1) + [True]
    assert all(c.iterations == it and c.lr_schedule == "step" and c.lr_step == step
               and c.model == "rlfn_ntire" for c in ws)
    last = prm["train_stages"][max(prm["train_stages"], key=int)]  # the contrastive stage
    assert ws[-1].contrastive_weight == last["contrastive_weight"]
    assert not any(c.contrastive for c in abl.stage_configs(s, "rlfb_no_cl", data))
    body = {m: abl.stage_configs(s, m, data) for m in
            ("rfdb", "rfdb_r48", "rfdb_r52", "rlfb")}  # the same recipe for every block
    recipes = {m: [(c.iterations, c.contrastive, c.lr_step) for c in cs] for m, cs in
               body.items()}
    assert len({json.dumps(r) for r in recipes.values()}) == 1
    assert [cs[0].model for cs in body.values()] == ["rfdb", "rfdb_r48", "rfdb_r52",
                                                     "rlfn_ntire"]
    (e,) = abl.stage_configs(s, "e2000", data)
    assert e.iterations == n * it and e.lr_schedule == "step" and e.lr_step == n * step > step
    assert not e.contrastive
    (c,) = abl.stage_configs(s, "clr", data)
    assert c.iterations == n * it and c.lr_schedule == "cyclic" and c.lr_cycle == it
    assert c.lr_step == step
    assert abl.resolve(s, "ws_1")["runs_as"] == "rlfb_no_cl"
    ed = abl.stage_configs(s, "edsr_cl_ws", data)
    assert [x.model for x in ed] == ["edsr_baseline"] * n and ed[-1].contrastive
    (ep,) = abl.stage_configs(s, "edsr", data)
    assert ep.model == "edsr_baseline" and ep.iterations == n * it and not ep.contrastive
    with pytest.raises(abl.AblationError, match="unknown ablation 'bogus'; known: rfdb"):
        abl.resolve(s, "bogus")
    bad = s.model_copy(update={"ablation": s.ablation.model_copy(
        update={"variants": {"x": {"model": "rfdb", "schedule": "sgdr"}}})})
    with pytest.raises(abl.AblationError, match="schedule"):
        abl.stage_overrides(bad, "x")


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update(stages=0), "ablation.stages: must be >= 1, got 0"),
    (lambda a: a.update(stages="two"), "ablation.stages: expected a number, got 'two'"),
    (lambda a: a.update(nonsense=1), "ablation: unknown key(s) nonsense; known: name, stages"),
    (lambda a: a.update(variants={}), "ablation.variants: expected a mapping name -> "),
])
def test_ablation_section_is_typed_settings(tmp_path, edit, message):
    """``ablation:`` is a section of pipeline.settings: its defaults are the model's, and a bad
    key or value is one AblationError naming the key (no file prefix, as the stage said it)."""
    prm = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = AblationSettings(variants={"x": {"model": "rfdb"}})
    assert (defaults.stages, defaults.out, defaults.dir, defaults.runtime) == (
        3, "metrics/ablation.json", "ablations", {"max_images": 3, "warmup": 1})
    edit(prm["ablation"])
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(prm))
    for load in (load_settings, lambda f: load_section("ablation", f)):
        with pytest.raises(abl.AblationError) as e:
            load(p)
        assert str(e.value).startswith(message) and e.value.exit_code == 2, str(e.value)



# ------------------------------------------------------------------ the report
def test_report_from_dvc_exp_show_fixture(tmp_path):
    show = json.loads(FIXTURE.read_text())
    rows = rep.collect(show)
    assert {"rfdb", "rlfb", "e2000", "clr", "edsr"} <= set(rows)
    assert all(r["experiment"].startswith("abl-") for r in rows.values())
    # a variant missing from the experiments is listed as not run
    show2 = json.loads(FIXTURE.read_text())
    out = tmp_path / "reports" / "ablations.md"
    assert rep.main(["--input", str(FIXTURE), "--params", str(ROOT / "params.yaml"),
                     "--out", str(out)]) == 0
    md = out.read_text()
    for title in ("## Body block", "## Contrastive loss", "## Warm start", "## EDSR-baseline"):
        assert title in md
    assert "do not edit" in md and "direction, not the paper's values" in md
    assert "scripts/ablations.sh" in md
    r0 = rows["rlfb"]
    line = next(ln for ln in md.splitlines() if ln.startswith("| rfdb |"))
    assert f"{rows['rfdb']['psnr_y'] - r0['psnr_y']:+.3f}" in line
    assert f"{rows['rfdb']['params'] / 1e3:.1f}" in line
    assert "(= rlfb_no_cl)" in next(ln for ln in md.splitlines() if ln.startswith("| ws_1 |"))
    assert (out.with_suffix(".png")).read_bytes()[:4] == b"\x89PNG"
    # drop one experiment: its row says "not run"
    for rec in show2:
        for e in rec.get("experiments") or []:
            e["revs"] = [r for r in e["revs"] if r.get("name") != "abl-clr"]
    (tmp_path / "s.json").write_text(json.dumps(show2))
    assert rep.main(["--input", str(tmp_path / "s.json"), "--params", str(ROOT / "params.yaml"),
                     "--out", str(tmp_path / "b.md")]) == 0
    md2 = (tmp_path / "b.md").read_text()
    assert "| clr | rlfn_ntire | not run |" in md2
    assert "## Not run\n\nclr" in md2


# ------------------------------------------------------------------ one real ablation
# pytest-timeout counts fixture setup too: the subprocess's own limit plus a minute for the
# module fixture (a project copy) and the checks, so the subprocess's error (with its output)
# is what a too-slow run reports.
@pytest.mark.timeout(ABLATE_TIMEOUT_S + 60)
def test_report_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch):
    """The report's entry contract (pipeline.entry.run_entry): an unreadable --input is exit 2,
    a failing `dvc exp show` exit 1, each one `error:` line naming it, and nothing written."""
    out = tmp_path / "reports" / "ablations.md"
    bad = tmp_path / "show.json"
    bad.write_text("{not json")
    assert rep.main(["--input", str(bad), "--out", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: not a readable"), err
    monkeypatch.chdir(tmp_path)  # no DVC repository here: `dvc exp show` fails
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert rep.main(["--out", str(out)]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err[0].startswith("error: dvc exp show --json --all-commits: exit code "), err
    assert not out.exists() and not out.parent.exists()


def test_real_tiny_ablation(project):
    _set_name(project, "ws_1")  # an alias: rlfb_no_cl's recipe under the name ws_1
    r = _ablate(project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    m = json.loads((project / "metrics" / "ablation.json").read_text())
    assert m["name"] == "ws_1" and m["runs_as"] == "rlfb_no_cl" and m["model"] == "rlfn_ntire"
    assert m["runs"] == 2 and m["iterations"] == 8 and m["schedule"] == "ws"
    assert 5 < m["psnr_y"] < 60 and 0 < m["ssim_y"] <= 1
    assert m["params"] == 317218 and m["flops"] > 1e9 and m["runtime_ms_cpu"] > 0
    for k in (1, 2):
        assert (project / "ablations" / "ws_1" / f"stage{k}" / "model.safetensors").exists()
    import sqlite3

    con = sqlite3.connect(project / "mlflow.db")
    runs = con.execute("select name from runs").fetchall()
    assert ("ablate",) in runs
    psnr = con.execute("select value from metrics where key = 'psnr_y'").fetchall()
    assert psnr and abs(psnr[0][0] - m["psnr_y"]) < 1e-6
