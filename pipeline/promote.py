"""Stage `promote`: move the registry alias `champion` to the new model only if it is better.

The candidate is the last stage's registered version. Its figures (the gate metric from
``evaluate.out``, CPU runtime from ``profile.out``) are recorded on the version, then
``pipeline.mlflow_registry.promote`` decides under a lock: promoted only if it beats the
current champion by more than ``promote.margin`` and stays within its budgets: the CPU time
relative to a reference model timed in the same run (``promote.runtime_budget_rel``: the
same decision on a fast or a slow machine), the NTIRE FLOPs (``promote.flops_budget_g``)
and, when set, the absolute ``promote.runtime_budget_ms``. ``promote.out``
(metrics/promote.json: ``promoted`` 0/1 and the candidate ``version``) is what ``dvc metrics
show`` shows; the decision with its reason and both models' figures goes to
``promote.details`` (reports/promotion.json: ``{"promoted", "version", "decision"}``) and
onto the version's tags.

A candidate built from code or params that are in no commit (its ``rlfn.git_state`` is
``dirty``; ``outputs-only``, what every ``dvc repro`` of a commit is by its last stage, is
not) is refused in team mode with one ``error:`` line naming it, its commit and the setting
``promote.allow_uncommitted`` (off by default), the champion left where it was, unless this
``dvc repro`` runs in a checkout whose code and params are committed (then the commit holds
the candidate's code: recorded as ``rlfn.git_committed``); on one machine it is decided as
any other, with one warning line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline import tags as T
from pipeline.entry import log, main
from pipeline.services import team_mode
from pipeline.settings import Settings, load_settings
from pipeline.stage_config import stage_data, train_config
from pipeline.dvcops import dvc_ancestor
from pipeline.tracking import git_state, stage_run, tracking_uri
from rlfn.errors import DataError
from rlfn.io import write_json


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def candidate(stage_dir: Path, stage: str, scale: int, name: str, figures: dict,
              data: dict | None = None):
    """The last stage's version (re-registered, with its lineage ``data``, if this tracking
    store has never seen it)."""
    from pipeline.mlflow_registry import log_and_register

    client = mlflow.MlflowClient()
    info_file = stage_dir / "mlflow.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    version = None
    if info.get("registered_model") == name:
        try:
            version = client.get_model_version(name, str(info["version"]))
        except mlflow.exceptions.MlflowException:
            version = None
    if version is None:
        version = log_and_register(stage_dir / "model.safetensors", scale,
                                   registered_name=name, tags={T.V_STAGE: stage}, data=data)
    for k, v in figures.items():
        client.set_model_version_tag(name, version.version, f"{T.FIGURE_PREFIX}{k}", str(v))
    return version


def uncommitted_policy(s: Settings, here: dict | None = None) -> tuple[str, str]:
    """What a candidate built from code or params in no commit gets, and why: ``refuse`` in
    team mode (what is served there must be code a teammate can fetch), unless
    ``promote.allow_uncommitted``, or unless this promote runs under ``dvc repro`` in a
    checkout whose code and params are its commit's (``here``, :func:`git_state`: ``clean``
    or ``outputs-only``): DVC runs promote only once every stage before it is up to date
    with those files, so the candidate's weights are that commit's even when it was trained
    before the commit was made (a ``dvc exp run`` refused, then committed and repro'd).
    ``warn`` otherwise (one machine). Returns ``(policy, note)``: the note ends the warning."""
    if not team_mode():
        return "warn", "(one machine: promoted as any other; team mode would refuse it)"
    if s.promote.allow_uncommitted:
        return "warn", "(allowed by promote.allow_uncommitted)"
    here = here if here is not None else git_state()
    if here["state"] in ("clean", "outputs-only") and dvc_ancestor():
        return "warn", (f"-- its code and params are commit {here['commit'].split('-')[0]}'s "
                        "now (this dvc repro found every stage before promote up to date)")
    return "refuse", ""


def _read(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read it ({e}); run the stage that writes it") from None


@flow(name="rlfn-promote", flow_run_name="promote")
def promote(settings: Settings | None = None) -> dict:
    from pipeline.mlflow_registry import promote as decide

    s = settings or load_settings()
    p, name = s.promote, s.registered_model
    evaluation, prof = _read(s.evaluate.out), _read(s.profile.out)
    if p.gate_metric not in evaluation:
        raise DataError(s.evaluate.out, f"has no {p.gate_metric!r} (promote.gate_metric)")
    figures = {p.gate_metric: evaluation[p.gate_metric], "params": prof["params"],
               "flops": prof["flops"], "runtime_ms_cpu": prof["runtime_ms_cpu"],
               "runtime_rel": prof["runtime_rel"]}
    for set_name, m in evaluation.get(f"x{s.scale}", {}).items():  # the serving canary's
        figures[T.SET_PSNR_FIGURE.format(set_name)] = m["psnr_y"]
    with stage_run("promote", s, s.section("promote")):
        mlflow.set_tracking_uri(tracking_uri(s))
        key = s.last_stage
        version = candidate(s.stage_dir(key), key, s.scale, name, figures,
                            stage_data(s, key, train_config(s, key)))
        here = git_state()
        policy, note = uncommitted_policy(s, here)
        decision = decide(name, version.version, gate_metric=p.gate_metric, margin=p.margin,
                          budgets=p.budgets(), uncommitted=policy)
        if decision.get("warning"):
            decision["warning"] += f" {note}"
            log.warning(decision["warning"])
            if note.startswith("-- its code"):  # the commit that holds it, for rlfn lineage
                mlflow.MlflowClient().set_model_version_tag(
                    name, version.version, T.V_GIT_COMMITTED, here["commit"].split("-")[0])
        out = {"promoted": int(bool(decision["promoted"])),
               "version": int(decision["candidate_version"])}
        write_json(p.out, out)
        write_json(p.details, {**out, "decision": decision})
        mlflow.log_artifact(p.details)
        mlflow.log_metric("promoted", out["promoted"])
        mlflow.set_tags({"promotion.promoted": str(bool(decision["promoted"])),
                         "promotion.reason": decision["reason"]})
        log.info(f"promote: {'PROMOTED' if decision['promoted'] else 'kept the champion'} - "
                 f"{decision['reason']}")
        return out


if __name__ == "__main__":
    sys.exit(main(promote))
