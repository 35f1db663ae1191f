"""Flow ``rlfn-retrain`` (deployment ``retrain``): retrain a git ref of the project on the
team's compute and leave what was trained one ``git checkout && dvc pull`` away.

1. check out ``ref`` of ``repo`` (a git URL or path; default ``RLFN_GIT_URL``, else this
   project's ``origin``) in a fresh work directory: an unknown ref, an unreachable repo or
   one without DVC is one clear error, before anything runs or is pushed;
2. start from the newest earlier retrain of the same commit (branch ``retrain/*`` whose parent
   is that commit) when there is one, so that a rerun with nothing changed trains nothing;
3. ``dvc pull`` (the worker's DVC remote: this project's ``.dvc/config.local`` is carried
   over), ``dvc repro`` (``--force`` with ``force``), ``dvc push``;
4. diff the metrics against the ref's, read the ``promote`` stage's decision;
5. commit ``dvc.lock``, ``metrics/``, ``plots/``, ``reports/`` to a new branch
   ``retrain/<flow-run-id>`` and push it to ``repo`` (only when a stage ran);
6. write the summary (metrics diff, decision and reason, branch, MLflow run) as the Prefect
   markdown artifact ``retrain-summary`` and to MLflow (a run tagged ``rlfn.kind=retrain``).

``python -m pipeline.retrain [--repo URL] [--ref REF] [--force] [--workdir DIR]`` runs the
same flow in this process (the CI runner's mode, .github/workflows/retrain.yml).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline import tags as T
from pipeline.dvcops import ROOT, run_dvc
from pipeline.entry import log, run_entry
from rlfn.errors import RLFNError

__all__ = ["retrain", "RetrainError", "push_results"]

COMMITTED = ("dvc.lock", "metrics", "plots", "reports")  # what a retrain branch records
BRANCH_PREFIX = "retrain/"
IDENTITY = ["-c", "user.name=rlfn-retrain", "-c", "user.email=rlfn-retrain@localhost"]


class RetrainError(RLFNError):
    """A retrain that cannot go on: ``RetrainError(what, reason)`` (exit 1)."""


def _git(args: list[str], cwd: Path | None = None, what: str | None = None,
         timeout: float = 600) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL,
                       env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise RetrainError(what or f"git {' '.join(args)}",
                           msg[-1] if msg else f"exit code {r.returncode}")
    return r.stdout.strip()


def project_dir() -> Path:
    """The project this flow runs from (a worker's ``RLFN_PROJECT_DIR``, else this checkout):
    its ``origin`` is the default ``repo``, its ``.dvc/config.local`` the DVC remote used."""
    return Path(os.environ.get("RLFN_PROJECT_DIR") or ROOT)


def default_repo() -> str:
    """The team's git repository ``RLFN_GIT_URL`` when set (team mode across hosts: ``stack.sh
    env``/``join`` export it, as the repro flow's ``push`` uses it), else the project's
    ``origin`` (the worker's checkout). A worker whose checkout has another origin (the server
    host's own worker: its project's upstream) so still pushes to the team's repository."""
    team = os.environ.get("RLFN_GIT_URL", "").strip()
    if team:
        return team
    proj = project_dir()
    try:
        url = _git(["remote", "get-url", "origin"], cwd=proj)
    except RetrainError:
        url = ""
    if not url:
        raise RetrainError(f"repo (parameter) / git remote 'origin' of {proj}",
                           "not given and this project has no origin to default to")
    return url


@task(cache_policy=NO_CACHE)
def checkout(repo: str, ref: str, work: Path) -> dict:
    """Clone ``repo`` into ``work`` and check out ``ref`` (or the newest earlier retrain of
    the same commit)."""
    _git(["clone", "--quiet", "--no-checkout", repo, str(work)],
         what=f"repo {repo}", timeout=1800)
    sha = None
    for cand in (f"origin/{ref}", ref):
        try:
            sha = _git(["rev-parse", "--verify", "--quiet", f"{cand}^{{commit}}"], cwd=work)
            break
        except RetrainError:
            continue
    if not sha:
        branches = _git(["branch", "-r", "--format=%(refname:short)"], cwd=work).split()
        names = [b.removeprefix("origin/") for b in branches if b not in ("origin/HEAD", "origin")]
        shown = ", ".join(names[:10]) or "none"
        raise RetrainError(f"ref {ref!r}", f"not found in {repo} (branches: {shown})")
    # the newest retrain of this very commit: start from its dvc.lock (nothing to redo)
    start, previous = sha, None
    rows = _git(["for-each-ref", "--sort=-committerdate",
                 "--format=%(refname:short) %(objectname)",
                 f"refs/remotes/origin/{BRANCH_PREFIX}"], cwd=work).splitlines()
    for row in rows:
        name, obj = row.split()
        if _git(["rev-parse", f"{obj}^"], cwd=work) == sha:
            start, previous = obj, name.removeprefix("origin/")
            break
    _git(["checkout", "--quiet", "--detach", start], cwd=work)
    if not (work / "dvc.yaml").is_file() or not (work / ".dvc").is_dir():
        raise RetrainError(f"repo {repo} at {ref}",
                           "is not a DVC project (no dvc.yaml / .dvc); nothing to retrain")
    return {"sha": sha, "start": start, "previous": previous}


def _metrics(work: Path) -> dict[str, float]:
    """Every number of ``metrics/*.json``, flattened as ``file:key.sub``."""
    from pipeline.tracking import flatten_numbers

    out: dict[str, float] = {}
    for f in sorted((work / "metrics").glob("*.json")):
        try:
            nums = flatten_numbers(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
        out.update({f"{f.stem}:{k}": v for k, v in nums.items()})
    return out


def _diff(before: dict[str, float], after: dict[str, float]) -> list[dict]:
    rows = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if a != b:
            rows.append({"metric": k, "before": a, "after": b,
                         "change": None if a is None or b is None else b - a})
    return rows


def _decision(work: Path) -> dict:
    try:
        d = json.loads((work / "reports" / "promotion.json").read_text())
    except (OSError, ValueError):
        return {}
    dec = d.get("decision") or {}
    return {"promoted": bool(d.get("promoted")), "version": d.get("version"),
            "reason": dec.get("reason"), "champion_version": dec.get("champion_version")}


def _ran_stages(out: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out)


@task(cache_policy=NO_CACHE)
def reproduce(work: Path, force: bool) -> dict:
    try:
        remote = run_dvc(["remote", "default"], cwd=work, echo=False).strip() or "(none)"
    except RLFNError:
        remote = "(none)"
    try:
        pulled = run_dvc(["pull", "--allow-missing"], cwd=work, echo=False)
    except RLFNError as e:
        raise RetrainError(f"DVC remote {remote!r} (dvc pull in {work})",
                           f"cannot fetch the data: {e.reason[-600:]}") from None
    log.info(f"retrain: dvc pull: {pulled.strip().splitlines()[-1] if pulled.strip() else 'ok'}")
    out = run_dvc(["repro", *(["--force"] if force else [])], cwd=work)
    ran = _ran_stages(out)
    if ran:
        run_dvc(["push"], cwd=work)
    return {"ran": ran}


@task(cache_policy=NO_CACHE)
def publish(work: Path, branch: str, message: str) -> str:
    paths = [p for p in COMMITTED if (work / p).exists()]
    _git(["checkout", "--quiet", "-b", branch], cwd=work)
    _git(["add", "--", *paths], cwd=work)
    _git([*IDENTITY, "commit", "--quiet", "--allow-empty", "-m", message], cwd=work)
    _git(["push", "--quiet", "origin", f"{branch}:refs/heads/{branch}"], cwd=work,
         what=f"git push of {branch} to origin")
    return _git(["rev-parse", "HEAD"], cwd=work)


def push_results(project: Path, repo: str, branch: str, message: str) -> str:
    """Commit ``project``'s ``dvc.lock``, ``metrics/``, ``plots/``, ``reports/`` on top of its
    HEAD as branch ``branch`` of ``repo`` (pushed there), leaving the project's own branch,
    index and files as they are (a temporary index; no checkout): what ``repro`` with
    ``push`` does on a worker whose clone others use too. Returns the commit."""
    paths = [p for p in COMMITTED if (project / p).exists()]
    with tempfile.TemporaryDirectory(prefix="rlfn-index-") as d:
        env_index = {"GIT_INDEX_FILE": str(Path(d) / "index")}
        _git_env(["read-tree", "HEAD"], project, env_index)
        _git_env(["add", "--", *paths], project, env_index)
        tree = _git_env(["write-tree"], project, env_index)
    commit = _git([*IDENTITY, "commit-tree", tree, "-p", "HEAD", "-m", message], cwd=project)
    _git(["push", "--quiet", repo, f"{commit}:refs/heads/{branch}"], cwd=project,
         what=f"git push of {branch} to {repo}")
    return commit


def _git_env(args: list[str], cwd: Path, extra: dict[str, str]) -> str:
    """``_git`` with ``extra`` in its environment (a temporary index)."""
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL,
                       env={**os.environ, "GIT_TERMINAL_PROMPT": "0", **extra})
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise RetrainError(f"git {' '.join(args)}",
                           msg[-1] if msg else f"exit code {r.returncode}")
    return r.stdout.strip()


def _summary_md(s: dict) -> str:
    lines = [f"# Retrain of `{s['ref']}` ({s['sha'][:12]})", ""]
    if not s["ran"]:
        lines.append(f"**Nothing changed**: no stage reran ({s['nothing_reason']}); "
                     "nothing trained, nothing pushed.")
    else:
        lines.append(f"Stages rerun: {', '.join(f'`{x}`' for x in s['ran'])}")
    dec = s.get("decision") or {}
    if s["ran"] and dec:
        verdict = "**PROMOTED**" if dec.get("promoted") else "**not promoted**"
        lines.append(f"\nPromotion: {verdict}, candidate version {dec.get('version')}: "
                     f"{dec.get('reason')}")
    if s.get("branch"):
        lines.append(f"\nBranch: `{s['branch']}` ({s['branch_commit'][:12]}) on {s['repo']}: "
                     f"`git checkout {s['branch']} && dvc pull`")
    if s.get("mlflow_run"):
        lines.append(f"\nMLflow run: `{s['mlflow_run']}`")
    if s["diff"]:
        lines += ["", "| metric | before | after | change |", "| --- | --- | --- | --- |"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines += [f"| {r['metric']} | {fmt(r['before'])} | {fmt(r['after'])} | "
                  f"{fmt(r['change'])} |" for r in s["diff"]]
    elif s["ran"]:
        lines.append("\nMetrics: unchanged.")
    return "\n".join(lines) + "\n"


def _to_mlflow(work: Path, s: dict) -> str:
    """The summary as an MLflow run of the project's experiment (``rlfn.kind=retrain``):
    sets ``s["mlflow_run"]`` and returns the summary's markdown, rendered once with it."""
    import mlflow

    from pipeline.tracking import experiment_id, tracking_uri
    from pipeline.settings import read_params

    with contextlib.chdir(work):  # without a server: the checkout's own mlflow.db, as its stages
        prm = read_params("params.yaml")
        mlflow.set_tracking_uri(tracking_uri(prm))
        exp = experiment_id(mlflow, prm)
    dec = s.get("decision") or {}
    tags = {T.KIND: "retrain", T.RETRAIN_REF: s["ref"], T.GIT_COMMIT: s["sha"],
            "rlfn.retrain.stages": ",".join(s["ran"]) or "none",
            "rlfn.retrain.branch": s.get("branch") or "",
            "promotion.promoted": str(bool(dec.get("promoted"))) if s["ran"] else "n/a",
            "promotion.reason": (dec.get("reason") or "") if s["ran"] else "nothing reran"}
    with mlflow.start_run(experiment_id=exp, run_name=f"retrain {s['flow_run']}",
                          tags=tags) as run:
        s["mlflow_run"] = run.info.run_id
        md = _summary_md(s)
        mlflow.log_text(md, "retrain_summary.md")
        mlflow.log_dict(s, "retrain_summary.json")
        nums = {r["metric"].replace(":", "."): r["after"] for r in s["diff"]
                if r["after"] is not None}
        if nums:
            mlflow.log_metrics(nums)
    return md


@flow(name="rlfn-retrain", flow_run_name="retrain-{ref}")
def retrain(repo: str | None = None, ref: str = "main", force: bool = False,
            workdir: str | None = None) -> dict:
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    t0 = time.monotonic()
    repo = repo or default_repo()
    run_id = str(flow_run.id or f"local-{os.getpid()}")
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rlfn-retrain-"))
    work = base / "main"
    if work.exists():
        raise RetrainError(f"workdir {base}", "already holds a checkout (main/); give a new one")
    base.mkdir(parents=True, exist_ok=True)
    shared = project_dir().parent / "shared"  # the reference data beside it, as ../shared
    if shared.is_dir() and not (base / "shared").exists():
        (base / "shared").symlink_to(shared.resolve())
    try:
        log.info(f"retrain: {repo} at {ref} in {work} (flow run {run_id})")
        co = checkout(repo, ref, work)
        local_cfg = project_dir() / ".dvc" / "config.local"  # the worker's remote + credentials
        if local_cfg.is_file():
            shutil.copy2(local_cfg, work / ".dvc" / "config.local")
        if co["previous"]:
            log.info(f"retrain: {co['sha'][:12]} was retrained before ({co['previous']}): "
                     "starting from its dvc.lock")
        before = _metrics(work)
        res = reproduce(work, force)
        s: dict[str, Any] = {"repo": repo, "ref": ref, "sha": co["sha"], "flow_run": run_id,
                             "previous_retrain": co["previous"], "ran": res["ran"],
                             "diff": _diff(before, _metrics(work)), "decision": _decision(work)}
        if not res["ran"]:
            s["nothing_reason"] = (f"the outputs of {co['previous']} match this commit"
                                   if co["previous"] else "dvc.lock matches the workspace")
            log.info(f"retrain: nothing changed ({s['nothing_reason']}): nothing trained")
        else:
            branch = f"{BRANCH_PREFIX}{run_id}"
            dec = s["decision"]
            verdict = ("promoted" if dec.get("promoted") else "not promoted") if dec \
                else "no decision"
            msg = (f"retrain {ref} ({co['sha'][:12]}): {verdict}\n\nstages: {', '.join(res['ran'])}"
                   f"\nreason: {dec.get('reason')}\nflow run: {run_id}\n")
            s["branch"], s["branch_commit"] = branch, publish(work, branch, msg)
            log.info(f"retrain: pushed {branch} to {repo}")
        md = _to_mlflow(work, s)
        try:
            create_markdown_artifact(markdown=md, key="retrain-summary",
                                     description=f"retrain of {ref}")
        except Exception as e:  # no Prefect API (a bare python -m run without a server)
            log.warning(f"retrain: summary artifact not written to Prefect ({type(e).__name__})")
        s["seconds"] = round(time.monotonic() - t0, 1)
        summary = Path(os.environ.get("RLFN_RETRAIN_SUMMARY", base / "retrain_summary.md"))
        summary.write_text(md)
        log.info("retrain summary:\n" + md)
        return s
    finally:
        if not workdir:  # a temporary checkout: gone, whatever happened (the log has it all)
            shutil.rmtree(base, ignore_errors=True)


def summary_of(flow_run_id: str) -> str:
    """The markdown summary a retrain flow run left in Prefect (artifact ``retrain-summary``),
    or its final state when it failed before writing one."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                ArtifactFilterKey)

    async def read() -> str:
        async with get_client() as c:
            fr = await c.read_flow_run(UUID(flow_run_id))
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
                key=ArtifactFilterKey(any_=["retrain-summary"])))
            if arts:
                return str(arts[0].data)
            state = fr.state
            return (f"# Retrain flow run {flow_run_id}: {state.name if state else 'unknown'}"
                    f"\n\n{(state.message if state else '') or ''}\n")

    return asyncio.run(read())


def main(argv: list[str] | None = None) -> int:
    """The command line, under the pipeline's entry contract (``pipeline.entry``). Its
    settings are the ref's own ``params.yaml``, checked by the stages it runs."""
    p = argparse.ArgumentParser(prog="python -m pipeline.retrain", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=None, help="git URL or path (default: $RLFN_GIT_URL, else origin)")
    p.add_argument("--ref", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="dvc repro --force")
    p.add_argument("--workdir", default=None,
                   help="where to check out (kept; default: a temporary folder, removed)")
    p.add_argument("--summary-of", metavar="FLOW_RUN_ID", default=None,
                   help="print the summary of a finished retrain flow run (from Prefect)")
    args = p.parse_args(argv)

    def work() -> None:
        if args.summary_of:
            print(summary_of(args.summary_of), end="")
            return
        s = retrain(repo=args.repo, ref=args.ref, force=args.force, workdir=args.workdir)
        print(json.dumps({k: s.get(k) for k in ("ref", "sha", "ran", "branch", "decision",
                                                 "mlflow_run")}))

    return run_entry(work)


if __name__ == "__main__":
    sys.exit(main())
