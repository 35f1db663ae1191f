"""The retrain flow in runner mode (no PREFECT_API_URL: ``bash scripts/retrain.sh`` runs
``python -m pipeline.retrain`` here, as the workflow does on a CI runner), on a one-stage DVC
project with a bare repository as its origin and a local DVC remote: the branch
``retrain/<id>`` pushed with the new dvc.lock and metrics, the data on the remote, the summary
written; a second retrain of the same commit trains nothing; bad input (an unknown ref, a
repository without DVC, one that does not exist) is one ``error:`` line and pushes nothing.

The dispatched mode (the deployment run by a worker of the team stack, a real model promoted
or not) is tests/test_stack_repro.py's ``test_retrain_dispatched_to_the_worker``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from prereq import ROOT
from servers import clean_env

MAKE = """import json, pathlib, yaml
n = yaml.safe_load(open("params.yaml"))["n"]
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/data.txt").write_text("x" * n)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("metrics/m.json").write_text(json.dumps({"value": n}))
"""

DVC_YAML = """stages:
  make:
    cmd: python make.py
    deps: [make.py]
    params: [n]
    outs: [out/data.txt]
    metrics:
      - metrics/m.json:
          cache: false
"""


def _git(cwd: Path, *args: str) -> str:
    r = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


@pytest.fixture()
def project(tmp_path) -> dict:
    """A one-stage DVC project (its remote a local folder), pushed to a bare origin; the
    worker-side checkout (RLFN_PROJECT_DIR) is a clone of it."""
    src, bare, remote = tmp_path / "src", tmp_path / "origin.git", tmp_path / "dvc-remote"
    src.mkdir()
    (src / "make.py").write_text(MAKE)
    (src / "dvc.yaml").write_text(DVC_YAML)
    (src / "params.yaml").write_text("n: 3\n")
    _git(src, "init", "-q", "-b", "main")
    subprocess.run([str(ROOT / ".venv" / "bin" / "dvc"), "init", "-q"], cwd=src, check=True,
                   timeout=120, env=clean_env())
    subprocess.run([str(ROOT / ".venv" / "bin" / "dvc"), "remote", "add", "-d", "here",
                    str(remote)], cwd=src, check=True, timeout=120, env=clean_env())
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "init")
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(bare)], check=True,
                   timeout=120)
    worker = tmp_path / "worker"
    subprocess.run(["git", "clone", "-q", str(bare), str(worker)], check=True, timeout=120)
    return {"bare": bare, "remote": remote, "worker": worker, "tmp": tmp_path}


def _retrain(p: dict, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = clean_env(RLFN_PROJECT_DIR=str(p["worker"]), **{"RLFN_GIT_URL": "", **extra},
                    RLFN_RETRAIN_SUMMARY=str(p["tmp"] / "summary.md"),
                    PREFECT_HOME=str(p["tmp"] / "prefect-home"),
                    PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run(["bash", str(ROOT / "scripts" / "retrain.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _branches(bare: Path) -> list[str]:
    return _git(bare, "for-each-ref", "--format=%(refname:short)",
                "refs/heads/retrain/").split()


@pytest.mark.timeout(900)
def test_runner_mode_pushes_a_branch_then_trains_nothing(project):
    r = _retrain(project)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "no PREFECT_API_URL: running the flow here" in out
    branches = _branches(project["bare"])
    assert len(branches) == 1 and branches[0].startswith("retrain/"), branches
    b = branches[0]
    main = _git(project["bare"], "rev-parse", "main")
    assert _git(project["bare"], "rev-parse", f"{b}^") == main  # on top of what it trained
    lock = _git(project["bare"], "show", f"{b}:dvc.lock")
    assert "out/data.txt" in lock
    assert json.loads(_git(project["bare"], "show", f"{b}:metrics/m.json")) == {"value": 3}
    pushed = [f for f in project["remote"].rglob("*") if f.is_file()]
    assert pushed and any(f.read_bytes() == b"xxx" for f in pushed), pushed
    summary = (project["tmp"] / "summary.md").read_text()
    print(summary)
    assert "Stages rerun: `make`" in summary and b in summary
    assert "| m:value | - | 3.0000 | - |" in summary  # no metrics at main: new
    assert "MLflow run: `" in summary

    # the same commit again: starts from that branch, nothing reruns, nothing is pushed
    r2 = _retrain(project)
    out2 = r2.stdout + r2.stderr
    assert r2.returncode == 0, out2[-5000:]
    summary2 = (project["tmp"] / "summary.md").read_text()
    assert "**Nothing changed**" in summary2 and b in summary2, summary2
    assert "Running stage" not in out2
    assert _branches(project["bare"]) == [b]

    # --force reruns it anyway: a new branch
    r3 = _retrain(project, "main", "--force")
    assert r3.returncode == 0, (r3.stdout + r3.stderr)[-5000:]
    assert len(_branches(project["bare"])) == 2


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["unknown ref", "no dvc", "no repo"])
def test_bad_input_is_one_error_and_pushes_nothing(project, case):
    args: list[str] = []
    if case == "unknown ref":
        args, want = ["no-such-ref"], "error: ref 'no-such-ref': not found in "
    elif case == "no dvc":
        nodvc = project["tmp"] / "plain"
        nodvc.mkdir()
        (nodvc / "a.txt").write_text("a")
        _git(nodvc, "init", "-q", "-b", "main")
        _git(nodvc, "add", "-A")
        _git(nodvc, "commit", "-qm", "a")
        _git(project["worker"], "remote", "set-url", "origin", str(nodvc))
        want = "is not a DVC project (no dvc.yaml / .dvc); nothing to retrain"
    else:
        _git(project["worker"], "remote", "set-url", "origin",
             str(project["tmp"] / "nowhere.git"))
        want = f"error: repo {project['tmp'] / 'nowhere.git'}: "
    r = _retrain(project, *args)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    print(case, errors)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(errors) == 1 and want in errors[0], r.stderr[-3000:]
    assert _branches(project["bare"]) == []
    assert not [f for f in project["remote"].rglob("*") if f.is_file()] \
        if project["remote"].exists() else True


@pytest.mark.timeout(600)
def test_the_team_repository_wins_over_origin(project):
    """``RLFN_GIT_URL`` set (team mode across hosts) and the worker's checkout's origin another
    repository (the server host's own worker: its project's upstream): the retrain checks out
    and pushes to ``RLFN_GIT_URL``; the origin gets nothing."""
    upstream = project["tmp"] / "upstream.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(project["bare"]), str(upstream)],
                   check=True, timeout=120)
    _git(project["worker"], "remote", "set-url", "origin", str(upstream))
    r = _retrain(project, RLFN_GIT_URL=str(project["bare"]))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert len(_branches(project["bare"])) == 1, r.stdout[-3000:]
    assert _branches(upstream) == []
