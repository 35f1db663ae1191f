"""Lineage of registered versions, against real MLflow (a SQLite store in a temporary folder),
real DVC (its own hashes) and the real ``rlfn lineage`` command.

* ``rlfn.lineage.dvc_md5`` equals the md5 ``dvc add`` records, for a file and a folder;
* ``log_and_register`` inside ``pipeline.tracking.stage_run`` (the stages' own run) records on
  the version: the DVC md5s of the manifest, patch store, validation set, init and weights,
  the git commit and dirty flag, the params hash, the repro and its parent run; logs the
  manifest as the run's MLflow dataset input (digest and row counts); writes a description;
  and creates nothing when a data path is missing;
* ``rlfn lineage`` prints all that for ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and
  ``NAME/VERSION``, says ``present`` / ``differs`` / ``missing`` for each data item as the
  workspace changes, and fails with one line for an unknown model, alias or version, a bad
  reference and an unreachable server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402

import imagefiles  # noqa: E402
from pipeline.lineage import parse_model_ref  # noqa: E402
from rlfn.cli import main as rlfn_main  # noqa: E402
from rlfn.errors import DataError  # noqa: E402
from rlfn.lineage import dvc_md5  # noqa: E402
from servers import clean_env, free_port  # noqa: E402

NAME = "rlfn-x4"


@pytest.fixture(scope="module", autouse=True)
def _restore_tracking_uri():
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_uri = getattr(tracking_utils, "_tracking_uri", None)
    old_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RLFN_REPRO_ID")}
    yield
    mlflow.set_tracking_uri(old_uri)
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --------------------------------------------------------------------------------------------
# DVC's hashes


def test_dvc_md5_equals_what_dvc_records(tmp_path):
    """``dvc add`` (DVC itself) on a folder with nested files and on one file."""
    repo = tmp_path / "repo"
    (repo / "data" / "sub").mkdir(parents=True)
    imagefiles.make("good", repo / "data" / "a.png")
    (repo / "data" / "sub" / "b.txt").write_text("b\n")
    (repo / "data" / "sub" / "c é.bin").write_bytes(bytes(range(256)) * 3)
    (repo / "one.bin").write_bytes(b"\x00\x01 one file\n" * 100)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["init", "--no-scm", "-q"], ["add", "-q", "data"], ["add", "-q", "one.bin"]):
        r = subprocess.run(dvc + cmd, cwd=repo, capture_output=True, text=True, timeout=300,
                           env=clean_env())
        assert r.returncode == 0, r.stderr[-2000:]
    for target in ("data", "one.bin"):
        recorded = yaml.safe_load((repo / f"{target}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_md5(repo / target) == recorded, target
    assert dvc_md5(repo / "nothing") is None


def test_parse_model_ref():
    assert parse_model_ref("models:/rlfn-x4@champion") == ("rlfn-x4", "champion", None)
    assert parse_model_ref("models:/rlfn-x4/3") == ("rlfn-x4", None, "3")
    assert parse_model_ref("rlfn-x4/12") == ("rlfn-x4", None, "12")
    for bad in ("rlfn-x4", "models:/a/b/c", "models:/x/notanumber", ""):
        with pytest.raises(ValueError):
            parse_model_ref(bad)


# --------------------------------------------------------------------------------------------
# A registered version with its lineage


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A small project workspace: a real manifest, a real patch store, validation images and
    trained weights (seeded, untrained), at the paths the pipeline uses."""
    import torch

    from rlfn.data.manifest import build_manifest
    from rlfn.data.patches import build_patch_store
    from rlfn.data.sources import ResolvedSource
    from rlfn.models import build_model
    from rlfn.weights import save_model

    ws = tmp_path_factory.mktemp("ws")
    train = ws / "data" / "sample" / "train"
    train.mkdir(parents=True)
    for i in range(3):
        imagefiles.make("good", train / f"im{i}.png", h=48 + 4 * i, w=40)
    imagefiles.make("text", train / "broken.png")  # a rejected row
    val = ws / "data" / "sample" / "Set5"
    val.mkdir(parents=True)
    imagefiles.make("good", val / "v.png", h=32, w=32)
    build_manifest([ResolvedSource("sample", "train", "folder", train)],
                   ws / "data" / "manifest.parquet", progress=False, workers=1)
    pairs = [(f"im{i}", train / f"im{i}.png", None) for i in range(3)]
    build_patch_store(pairs, 4, ws / "data" / "patches" / "x4.arrow", progress=False)
    torch.manual_seed(0)
    (ws / "models" / "stage1").mkdir(parents=True)
    save_model(build_model("rlfn_ntire", 4), ws / "models" / "stage1" / "model.safetensors")
    torch.manual_seed(1)
    (ws / "models" / "stage2").mkdir(parents=True)
    save_model(build_model("rlfn_ntire", 4), ws / "models" / "stage2" / "model.safetensors")
    return ws


DATA = {"manifest": "data/manifest.parquet", "patches": "data/patches",
        "val": "data/sample/Set5", "init": "models/stage1/model.safetensors"}


@pytest.fixture(scope="module")
def registered(workspace, tmp_path_factory) -> dict:
    """``log_and_register`` as ``train_stage@2`` calls it, inside ``stage_run``."""
    from pipeline.tracking import stage_run
    from pipeline.mlflow_registry import log_and_register

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("RLFN_REPRO_ID", "test-repro-42")
    mp.chdir(workspace)  # stages run in the project root: paths are recorded relative to it
    prm = {"mlflow": {"experiment": "lineage", "artifacts": str(store / "art")}}
    section = {"train": {"lr": 0.001}, "train_stages.2": {"init": DATA["init"]}}
    try:
        with stage_run("train_stage@2", prm, section) as run:
            mv = log_and_register("models/stage2/model.safetensors", 4,
                                  tags={"rlfn.stage": "2"}, figures={"val_psnr_y": 27.5},
                                  data=DATA)
        client = mlflow.MlflowClient(uri)
        client.set_registered_model_alias(NAME, "champion", mv.version)
        stage = client.get_run(run.info.run_id)
    finally:
        mp.undo()
    return {"uri": uri, "version": mv, "run": stage, "store": store}


def test_version_carries_its_lineage(registered, workspace):
    from pipeline.tracking import git_commit

    mv, run = registered["version"], registered["run"]
    tags = mv.tags
    for item, rel in {**DATA, "weights": "models/stage2/model.safetensors"}.items():
        assert tags[f"rlfn.data.{item}.path"] == rel
        assert tags[f"rlfn.data.{item}.md5"] == dvc_md5(workspace / rel), item
    assert tags["rlfn.data.patches.md5"].endswith(".dir")
    commit = git_commit()
    assert tags["rlfn.git_commit"] == commit == run.data.tags["git_commit"]
    assert tags["rlfn.git_dirty"] == ("true" if commit.endswith("-dirty") else "false")
    assert tags["rlfn.params_hash"] == run.data.tags["params_hash"]
    assert len(tags["rlfn.params_hash"]) == 16
    assert tags["rlfn.repro_id"] == "test-repro-42"
    parent = run.data.tags["mlflow.parentRunId"]
    assert tags["rlfn.repro_run_id"] == parent
    client = mlflow.MlflowClient(registered["uri"])
    assert client.get_run(parent).data.tags["rlfn.kind"] == "repro"
    assert tags["rlfn.dvc_stage"] == "train_stage@2" and tags["rlfn.stage"] == "2"
    assert tags["rlfn.run_id"] == run.info.run_id == mv.run_id

    # The manifest is the run's MLflow dataset input: digest = its DVC md5, row counts.
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "manifest"
    assert inp.dataset.digest == tags["rlfn.data.manifest.md5"]
    itags = {t.key: t.value for t in inp.tags}
    assert itags["mlflow.data.context"] == "training"
    assert itags["rlfn.rows"] == "4" and itags["rlfn.rows.usable"] == "3"
    assert itags["rlfn.rows.rejected"] == "1" and itags["rlfn.rows.split.train"] == "4"
    assert itags["rlfn.patches.images"] == "3"
    assert json.loads(inp.dataset.profile)["num_rows"] == 4

    # The description: a few lines saying the same.
    desc = mv.description
    assert 4 <= len(desc.splitlines()) <= 12, desc
    for needle in ("train_stage@2", "test-repro-42", parent, commit,
                   tags["rlfn.params_hash"], tags["rlfn.data.manifest.md5"],
                   tags["rlfn.data.patches.md5"], tags["rlfn.data.weights.md5"],
                   "4 rows: 3 usable, 1 rejected", "3 images", "val_psnr_y 27.5"):
        assert needle in desc, (needle, desc)


def test_nothing_registered_when_data_is_missing(registered, workspace, monkeypatch):
    from pipeline.mlflow_registry import log_and_register

    monkeypatch.chdir(workspace)
    mlflow.set_tracking_uri(registered["uri"])
    client = mlflow.MlflowClient(registered["uri"])
    before = len(client.search_model_versions(f"name = '{NAME}'"))
    exp = client.get_experiment_by_name("lineage").experiment_id
    with mlflow.start_run(experiment_id=exp) as run:
        with pytest.raises(FileNotFoundError, match="no/such/dir"):
            log_and_register("models/stage2/model.safetensors", 4,
                             data={"manifest": DATA["manifest"], "patches": "no/such/dir"})
    assert len(client.search_model_versions(f"name = '{NAME}'")) == before
    r = client.get_run(run.info.run_id)
    assert not r.inputs.dataset_inputs  # nothing logged either
    assert not client.list_artifacts(run.info.run_id)


def test_promote_reregisters_with_the_lineage(registered, workspace, monkeypatch):
    """The promote stage's fallback (a tracking store that never saw the last stage's
    version, e.g. the stages ran elsewhere): the re-registered version carries the data too."""
    from pipeline.promote import candidate

    monkeypatch.chdir(workspace)
    mlflow.set_tracking_uri(registered["uri"])
    client = mlflow.MlflowClient(registered["uri"])
    exp = client.get_experiment_by_name("lineage").experiment_id
    with mlflow.start_run(experiment_id=exp):
        mv = candidate.fn(Path("models/stage2"), "2", 4, NAME, {"mean_psnr_y": 27.0}, DATA)
    assert int(mv.version) > int(registered["version"].version)  # a new version
    tags = client.get_model_version(NAME, mv.version).tags
    for item, rel in DATA.items():
        assert tags[f"rlfn.data.{item}.md5"] == dvc_md5(workspace / rel), item
    assert tags["rlfn.figure.mean_psnr_y"] == "27.0" and tags["rlfn.stage"] == "2"


# --------------------------------------------------------------------------------------------
# rlfn lineage


def _lineage(capsys, *args) -> tuple[int, str, str]:
    code = rlfn_main(["lineage", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_rlfn_lineage_prints_it_and_checks_the_workspace(registered, workspace, capsys,
                                                         monkeypatch, tmp_path):
    mv = registered["version"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.chdir(workspace)
    code, out, _ = _lineage(capsys, f"models:/{NAME}@champion")
    assert code == 0, out
    tags = mv.tags
    assert out.startswith(f"{NAME} version {mv.version} @champion")
    for needle in (mv.run_id, tags["rlfn.git_commit"], tags["rlfn.params_hash"],
                   "test-repro-42", tags["rlfn.repro_run_id"], "val_psnr_y 27.5",
                   "dataset     manifest digest " + tags["rlfn.data.manifest.md5"],
                   "rows 4", "rows.usable 3"):
        assert needle in out, (needle, out)
    for item in ("manifest", "patches", "val", "init", "weights"):
        line = next(x for x in out.splitlines() if x.strip().startswith(item + " "))
        assert "present" in line and tags[f"rlfn.data.{item}.md5"] in line, line
    assert "startup_s" in out  # the run's metrics

    # The same version by number, and as NAME/VERSION; JSON; --check passes
    for ref in (f"models:/{NAME}/{mv.version}", f"{NAME}/{mv.version}"):
        assert _lineage(capsys, ref)[1] == out
    code, js, _ = _lineage(capsys, f"{NAME}/{mv.version}", "--json", "--check")
    rep = json.loads(js)
    assert code == 0 and {d["workspace"] for d in rep["data"].values()} == {"present"}

    # The workspace changes: one folder gains a file, a file is gone.
    imagefiles.make("good", workspace / "data" / "sample" / "Set5" / "new.png")
    moved = tmp_path / "init.safetensors"
    shutil.move(workspace / DATA["init"], moved)
    try:
        code, out, _ = _lineage(capsys, f"models:/{NAME}@champion")
        state = {line.split()[0]: line.split()[1] for line in out.splitlines()
                 if line.startswith("    ")}
        assert state == {"manifest": "present", "patches": "present", "val": "differs",
                         "init": "missing", "weights": "present"}, out
        assert code == 0
        assert _lineage(capsys, f"models:/{NAME}@champion", "--check")[0] == 1
        # another workspace (--root): nothing of it there
        code, out, _ = _lineage(capsys, f"models:/{NAME}@champion", "--root", str(tmp_path))
        assert [line.split()[1] for line in out.splitlines()
                if line.startswith("    ")] == ["missing"] * 5, out
    finally:
        (workspace / "data" / "sample" / "Set5" / "new.png").unlink()
        shutil.move(moved, workspace / DATA["init"])


def test_rlfn_lineage_errors_are_one_line(registered, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.chdir(tmp_path)
    for ref, words in ((f"models:/{NAME}/99", "not found"),
                       (f"models:/{NAME}@nosuchalias", "alias nosuchalias not found"),
                       ("models:/nosuchmodel@champion", "nosuchmodel")):
        code, out, err = _lineage(capsys, ref)
        assert code == 1 and out == "", (ref, out)
        (line,) = [x for x in err.splitlines() if x.strip()]
        assert line.startswith("error: ") and words in line, line
    code, _, err = _lineage(capsys, "not a model ref")
    assert code == 2 and "expected models:/NAME@ALIAS" in err
    code, _, err = _lineage(capsys, "x/1", "--tracking-uri", f"sqlite:///{tmp_path}/none.db")
    assert code == 2 and "no such tracking store" in err
    assert not (tmp_path / "none.db").exists()  # not created by asking


def test_rlfn_lineage_default_store_is_the_stages_rule(tmp_path, monkeypatch, capsys):
    """Without MLFLOW_TRACKING_URI the store is the one the stages use
    (``pipeline.tracking.tracking_uri``: params.yaml's ``mlflow.db``), under ``--root``; a
    missing one is one line, exit 2, and is not created."""
    from pipeline.tracking import tracking_uri
    from pipeline.lineage import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    prm = {"mlflow": {"db": "track/runs.db"}}
    (ws / "params.yaml").write_text(yaml.safe_dump(prm))
    want = ws / "track" / "runs.db"
    code, out, err = _lineage(capsys, "x/1", "--root", str(ws))
    assert code == 2 and out == "" and err.strip() == (
        f"error: MLFLOW_TRACKING_URI: not set, and there is no tracking store at {want} (run "
        "dvc repro, or point MLFLOW_TRACKING_URI at the server)"), err
    assert not want.exists()
    want.parent.mkdir()
    want.touch()
    assert default_tracking_uri(ws) == tracking_uri(prm, root=ws) == f"sqlite:///{want}"
    monkeypatch.chdir(ws)  # the stages' own view: the working directory is the project
    assert tracking_uri(prm) == f"sqlite:///{want}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert default_tracking_uri(ws) == "http://127.0.0.1:1"


def test_rlfn_lineage_unreachable_server_fails_fast(tmp_path):
    """The real command, in its own process: a closed port answers in seconds, exit 2."""
    port = free_port()  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "rlfn", "lineage", "models:/rlfn-x4@champion"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=clean_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "unreachable" in lines[0], r.stderr


# --------------------------------------------------------------------------------------------
# Git state: "code or params differ from the commit" vs "only what the stages write differs"

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "commit.gpgsign=false"]

# A tiny DVC project: stage `first` writes a cached output, a metric (never the same twice,
# as a real repro's timings) and reads `x`; stage `last` (wdir: sub) records what
# pipeline.tracking sees from inside the stage. Outputs declared with ${...} and foreach.
TINY_DVC = """\
stages:
  first:
    cmd: python first.py
    deps: [first.py]
    params: [x]
    outs: [out/a.txt]
    metrics:
      - ${paths.metric}:
          cache: false
  extra:
    foreach: ${parts}
    do:
      cmd: python -c "open('plots/${key}.csv', 'w').write('${item}')"
      outs:
        - plots/${key}.csv:
            cache: false
  last:
    wdir: sub
    cmd: python ../probe.py
    deps: [../out/a.txt, ../probe.py]
    outs:
      - seen.json:
          cache: false
"""
TINY_FIRST = """\
import json, os, uuid, yaml
os.makedirs("out", exist_ok=True); os.makedirs("metrics", exist_ok=True)
x = yaml.safe_load(open("params.yaml"))["x"]
open("out/a.txt", "w").write(str(x))
json.dump({"x": x, "run": uuid.uuid4().hex}, open("metrics/m.json", "w"))
"""
TINY_PROBE = """\
import json, os, sys
sys.path.insert(0, os.environ["RLFN_CODE"])
from pipeline.tracking import experiment, git_state
json.dump({"git": git_state(".."), "exp": experiment()}, open("seen.json", "w"))
"""


def _run(cmd, cwd, **env) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=clean_env(**env))
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def _tiny_repo(path: Path) -> Path:
    path.mkdir()
    (path / "sub").mkdir()
    (path / "dvc.yaml").write_text(TINY_DVC)
    (path / "params.yaml").write_text(yaml.safe_dump(
        {"x": 1, "paths": {"metric": "metrics/m.json"}, "parts": {"p1": "a", "p2": "b"}}))
    (path / "first.py").write_text(TINY_FIRST)
    (path / "probe.py").write_text(TINY_PROBE)
    (path / "plots").mkdir()
    _run(GIT + ["init", "-q", "-b", "main"], path)
    _run([sys.executable, "-m", "dvc", "init", "-q"], path)
    return path


def test_git_state_tells_outputs_from_code_and_params(tmp_path):
    """``git_state`` on a real git repository: outputs come from dvc.yaml (``${...}``,
    ``foreach``, ``wdir``) and dvc.lock; anything else tracked that differs is ``dirty``."""
    from pipeline.tracking import dvc_outputs, git_state

    repo = _tiny_repo(tmp_path / "repo")
    assert git_state(repo) == {"commit": "unknown", "state": "unknown", "changed": []}
    (repo / "metrics").mkdir()
    (repo / "metrics" / "m.json").write_text("{}")
    for k in ("p1", "p2"):
        (repo / "plots" / f"{k}.csv").write_text("0")
    (repo / "sub" / "seen.json").write_text("{}")
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "last": {"cmd": "python ../probe.py", "outs": [{"path": "seen.json", "md5": "0"}]}}}))
    _run(GIT + ["add", "-A"], repo)
    _run(GIT + ["commit", "-q", "-m", "init"], repo)
    head = _run(["git", "rev-parse", "HEAD"], repo).strip()
    assert dvc_outputs(repo) == {"dvc.lock", "out/a.txt", "metrics/m.json", "plots/p1.csv",
                                 "plots/p2.csv", "sub/seen.json"}
    assert git_state(repo) == {"commit": head, "state": "clean", "changed": []}

    # what `dvc repro` rewrites: dvc.lock and the outputs (a folder-free metric, a foreach
    # plot, an output under the stage's wdir)
    (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text() + "# rewritten\n")
    (repo / "metrics" / "m.json").write_text('{"run": 2}')
    (repo / "plots" / "p2.csv").write_text("1")
    (repo / "sub" / "seen.json").write_text('{"a": 1}')
    assert git_state(repo) == {"commit": f"{head}-dirty", "state": "outputs-only",
                               "changed": []}

    # code and params: dirty, naming them (and only them)
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("x: 1", "x: 2"))
    (repo / "first.py").write_text(TINY_FIRST + "# edited\n")
    st = git_state(repo)
    assert st == {"commit": f"{head}-dirty", "state": "dirty",
                  "changed": ["first.py", "params.yaml"]}, st
    _run(GIT + ["checkout", "-q", "--", "params.yaml", "first.py"], repo)
    (repo / "dvc.yaml").write_text(TINY_DVC + "\n")  # the pipeline itself is code
    assert git_state(repo)["changed"] == ["dvc.yaml"]
    _run(GIT + ["checkout", "-q", "--", "dvc.yaml"], repo)
    (repo / "untracked.py").write_text("x")  # untracked files are not looked at
    assert git_state(repo)["state"] == "outputs-only"

    # bad input: a dvc.lock that is not YAML is one error naming it
    (repo / "dvc.lock").write_text("stages: [unclosed\n")
    with pytest.raises(DataError, match=r"^dvc\.lock: not valid YAML"):
        git_state(repo)


def test_repro_and_experiment_seen_from_inside_the_last_stage(tmp_path):
    """Real ``dvc repro`` and ``dvc exp run``: a repro of a commit is ``outputs-only`` by its
    last stage (DVC rewrote dvc.lock and the first stage's metric before it), never
    ``dirty``; ``dvc exp run -S x=2`` is ``dirty`` (params.yaml) and its experiment's ref,
    recorded from inside the stage, is the ref DVC saves the experiment under and, with
    team mode's ``DVC_EXP_AUTO_PUSH``/``DVC_EXP_GIT_REMOTE``, pushes to the team's
    repository when the run ends."""
    repo = _tiny_repo(tmp_path / "repo")
    dvc = [sys.executable, "-m", "dvc"]
    env = {"RLFN_CODE": str(ROOT)}
    _run(dvc + ["repro", "-q"], repo, **env)
    _run(GIT + ["add", "-A"], repo)
    _run(GIT + ["commit", "-q", "-m", "pipeline and its lock"], repo)
    head = _run(["git", "rev-parse", "HEAD"], repo).strip()

    _run(dvc + ["repro", "-q", "-f"], repo, **env)
    seen = json.loads((repo / "sub" / "seen.json").read_text())
    assert seen["git"] == {"commit": f"{head}-dirty", "state": "outputs-only",
                           "changed": []}, seen
    assert seen["exp"] == {}

    # team mode across hosts: stack.sh env exports DVC_EXP_AUTO_PUSH and DVC_EXP_GIT_REMOTE
    # (the team's repository; a bare one here) and the clone has a default DVC remote
    team_git, storage = tmp_path / "team.git", tmp_path / "storage"
    _run(GIT + ["init", "-q", "--bare", str(team_git)], tmp_path)
    _run(dvc + ["remote", "add", "-q", "-d", "--local", "team", str(storage)], repo)
    _run(GIT + ["checkout", "-q", "--", "."], repo)
    _run(dvc + ["exp", "run", "-q", "-n", "try-x2", "-S", "x=2"], repo, **env,
         DVC_EXP_AUTO_PUSH="true", DVC_EXP_GIT_REMOTE=str(team_git))
    seen = json.loads((repo / "sub" / "seen.json").read_text())
    assert seen["git"]["state"] == "dirty" and seen["git"]["changed"] == ["params.yaml"], seen
    ref = f"refs/exps/{head[:2]}/{head[2:]}/try-x2"
    assert seen["exp"] == {"name": "try-x2", "baseline": head, "ref": ref}, seen
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], repo).split()
    assert ref in refs, refs
    # pushed with the run: another host fetches that ref and finds the params it ran with
    other = tmp_path / "other"
    _run(GIT + ["init", "-q", str(other)], tmp_path)
    _run(GIT + ["fetch", "-q", str(team_git), f"{ref}:{ref}"], other)
    assert yaml.safe_load(_run(["git", "show", f"{ref}:params.yaml"], other))["x"] == 2


def test_versions_record_git_state_and_experiment(registered, workspace, tmp_path,
                                                  monkeypatch, capsys):
    """``stage_run`` + ``log_and_register`` (the training stages' path) in a real git
    checkout: a version built with params.yaml changed inside ``dvc exp run`` carries
    ``rlfn.git_state`` ``dirty``, the changed path and the experiment's ref; one built with
    only dvc.lock rewritten is ``outputs-only``; ``rlfn lineage`` prints the difference;
    ``rlfn.git_commit``/``rlfn.git_dirty`` keep their meaning."""
    import pipeline.tracking as tracking
    from pipeline.mlflow_registry import log_and_register

    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "params.yaml").write_text("x: 1\n")
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    outs: [m.json]\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    _run(GIT + ["init", "-q", "-b", "main"], repo)
    _run(GIT + ["add", "-A"], repo)
    _run(GIT + ["commit", "-q", "-m", "init"], repo)
    head = _run(["git", "rev-parse", "HEAD"], repo).strip()
    monkeypatch.setattr(tracking, "ROOT", repo)  # the code's checkout, as the stages see it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.setenv("RLFN_REPRO_ID", "test-repro-git")
    monkeypatch.chdir(workspace)
    prm = {"mlflow": {"experiment": "lineage", "artifacts": str(registered["store"] / "art")}}
    name = "rlfn-x4-git"

    def register(stage: str) -> str:
        with tracking.stage_run(stage, prm, {"x": 1}):
            return log_and_register("models/stage2/model.safetensors", 4, registered_name=name,
                                    data={"init": DATA["init"]}).version

    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    v_out = register("train_stage@2")
    (repo / "params.yaml").write_text("x: 2\n")
    monkeypatch.setenv("DVC_EXP_NAME", "try-x2")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", head)
    v_dirty = register("train_stage@3")
    client = mlflow.MlflowClient(registered["uri"])
    ref = f"refs/exps/{head[:2]}/{head[2:]}/try-x2"

    t = client.get_model_version(name, v_out).tags
    assert t["rlfn.git_state"] == "outputs-only" and "rlfn.git_changed" not in t
    assert t["rlfn.git_commit"] == f"{head}-dirty" and t["rlfn.git_dirty"] == "true"
    assert not any(k.startswith("rlfn.exp.") for k in t), t
    t = client.get_model_version(name, v_dirty).tags
    assert t["rlfn.git_state"] == "dirty" and t["rlfn.git_changed"] == "params.yaml"
    assert t["rlfn.git_commit"] == f"{head}-dirty" and t["rlfn.git_dirty"] == "true"
    assert (t["rlfn.exp.name"], t["rlfn.exp.baseline"], t["rlfn.exp.ref"]) == (
        "try-x2", head, ref)
    run = client.get_run(t["rlfn.run_id"]).data.tags  # the run says the same
    assert run["rlfn.git_state"] == "dirty" and run["rlfn.exp.ref"] == ref
    assert ref in client.get_model_version(name, v_dirty).description

    code, out, _ = _lineage(capsys, f"models:/{name}/{v_out}")
    assert code == 0 and f"  commit      {head}-dirty (outputs only: code and params are the " \
        "commit's; only what the stages write differs)" in out, out
    assert "experiment" not in out
    code, out, _ = _lineage(capsys, f"models:/{name}/{v_dirty}")
    assert code == 0 and (f"  commit      {head}-dirty (dirty: code or params differ from it: "
                          "params.yaml)") in out, out
    assert f"  experiment  try-x2 (ref {ref}: dvc exp pull <remote> try-x2)" in out, out
    rep = json.loads(_lineage(capsys, f"models:/{name}/{v_dirty}", "--json")[1])
    assert rep["git_state"] == "dirty" and rep["experiment"]["ref"] == ref
    # promoted later under `dvc repro` of a commit that holds its code (pipeline.promote)
    client.set_model_version_tag(name, v_dirty, "rlfn.git_committed", head)
    out = _lineage(capsys, f"models:/{name}/{v_dirty}")[1]
    assert f"  committed   {head} (holds its code and params: found when it was promoted)" \
        in out, out
