"""Champion and promotion: the decision (``_decide``) and ``promote``, which moves the
``champion`` alias only if the candidate is better (rules in the package documentation)."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from pipeline import tags as T
from pipeline.tags import PROMOTION_PREFIX
from rlfn import failpoints
from rlfn.errors import RLFNError

from .locks import _lock
from .versions import RUNTIME_FIGURE, _client, figures_of, git_state

__all__ = ["promote", "champion", "CHAMPION_ALIAS", "PROMOTION_PREFIX", "LOCK_TIMEOUT_S",
           "UncommittedModel", "UNCOMMITTED_POLICIES", "uncommitted_check"]

UNCOMMITTED_POLICIES = ("allow", "warn", "refuse")
ALLOW_SETTING = "promote.allow_uncommitted"


class UncommittedModel(RLFNError):
    """The candidate was built from code or params that are in no commit and the policy is
    ``refuse`` (team mode): ``UncommittedModel(where, reason)`` (exit 1); the champion did not
    move."""


def uncommitted_check(cand: ModelVersion, policy: str) -> str | None:
    """The candidate's git state against ``policy`` (``allow``: nothing; ``warn``: the
    warning line for a ``dirty`` candidate; ``refuse``: ``UncommittedModel`` for one).
    ``clean`` and ``outputs-only`` candidates (code and params are the commit's) always pass;
    so does ``unknown`` (no git where it was built: nothing says it is uncommitted)."""
    if policy not in UNCOMMITTED_POLICIES:
        raise ValueError(f"uncommitted must be one of {', '.join(UNCOMMITTED_POLICIES)}, "
                         f"got {policy!r}")
    tags = dict(cand.tags or {})
    if policy == "allow" or git_state(tags) != "dirty":
        return None
    commit = tags.get(T.V_GIT_COMMIT, "unknown")
    changed = tags.get(T.V_GIT_CHANGED)
    what = f"models:/{cand.name}/{cand.version}"
    why = (f"built from code or params that are in no commit (commit {commit}"
           + (f"; differs from it: {changed}" if changed else "")
           + (f"; experiment {tags[T.V_EXP_NAME]}" if tags.get(T.V_EXP_NAME) else "") + ")")
    if policy == "refuse":
        raise UncommittedModel(what, f"not promoted: {why}; team mode serves only committed "
                                     f"code: commit it and rerun dvc repro, or set "
                                     f"{ALLOW_SETTING}: true")
    return f"{what}: {why}"

CHAMPION_ALIAS = "champion"
LOCK_TIMEOUT_S = 120.0


def _champion(client: MlflowClient, name: str, alias: str = CHAMPION_ALIAS
              ) -> ModelVersion | None:
    # Read the alias table of the registered model rather than classifying "not found" errors:
    # a failed read must raise, never look like "no champion" (that would promote anything).
    rm = client.get_registered_model(name)
    version = (rm.aliases or {}).get(alias)
    if version is None:
        return None
    return client.get_model_version(name, str(version))


def champion(registered_name: str, alias: str = CHAMPION_ALIAS) -> ModelVersion | None:
    """The version the ``champion`` alias points at; ``None`` if there is none (or no such
    registered model)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = _client()
    try:
        client.get_registered_model(registered_name)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return _champion(client, registered_name, alias)


def _decide(cand: ModelVersion, champ: ModelVersion | None, gate_metric: str, margin: float,
            budgets: Mapping[str, float], higher_is_better: bool) -> tuple[bool, str]:
    cf = figures_of(cand)
    v = cand.version
    gate = cf.get(gate_metric)
    if gate is None or not math.isfinite(gate):
        return False, f"candidate v{v} has no finite {gate_metric} figure to compare"
    for figure, limit in budgets.items():
        value = cf.get(figure)
        if value is None or not math.isfinite(value):
            return False, (f"candidate v{v} has no {figure} figure, and a budget of "
                           f"{limit:g} is set for it")
        if value > limit:
            what = ("runtime" if figure.startswith("runtime") else
                    "FLOPs" if figure == "flops" else figure)
            return False, (f"candidate v{v} is over the {what} budget: {figure} {value:g} > "
                           f"{limit:g}")
    if champ is None:
        return True, f"no champion yet; candidate v{v} ({gate_metric} {gate:g}) becomes champion"
    if str(champ.version) == str(v):
        return False, f"candidate v{v} already is the champion"
    held = figures_of(champ).get(gate_metric)
    if held is None or not math.isfinite(held):
        return False, (f"champion v{champ.version} has no {gate_metric} figure, so nothing shows "
                       f"v{v} is better; move the alias by hand if it is")
    gain = gate - held if higher_is_better else held - gate
    better = "higher" if higher_is_better else "lower"
    if gain > margin:
        return True, (f"candidate v{v} beats champion v{champ.version} on {gate_metric}: "
                      f"{gate:g} vs {held:g} ({better} is better, by {gain:g} > margin "
                      f"{margin:g})")
    return False, (f"candidate v{v} does not beat champion v{champ.version} on {gate_metric} by "
                   f"more than {margin:g}: {gate:g} vs {held:g} ({better} is better)")


def promote(registered_name: str, version: int | str, *, gate_metric: str = "mean_psnr_y",
            margin: float = 0.0, runtime_budget_ms: float | None = None,
            budgets: Mapping[str, float] | None = None,
            higher_is_better: bool = True, alias: str = CHAMPION_ALIAS, lock: str = "auto",
            lock_timeout_s: float = LOCK_TIMEOUT_S, uncommitted: str = "allow"
            ) -> dict[str, Any]:
    """Move ``alias`` (``champion``) to ``version`` only if it is better; return the decision.

    The decision: ``promoted``, ``reason``, ``registered_model``, ``alias``,
    ``candidate_version``, ``champion_version`` (the champion compared against, or None),
    ``candidate_figures``, ``champion_figures``, ``gate_metric``, ``margin``,
    ``higher_is_better``, ``runtime_budget_ms``, ``budgets``, ``lock`` and ``decided_at``.
    ``budgets`` maps a figure to its maximum (e.g. ``{"runtime_rel": 3.0, "flops": 4e10}``);
    ``runtime_budget_ms`` is the budget of ``runtime_ms_cpu``. It is also
    written as ``rlfn.promotion.*`` tags on the candidate. ``lock``: ``auto`` (file lock for a
    local store, lease otherwise), ``file`` or ``lease``. ``uncommitted``: what a candidate
    built from code or params in no commit (``rlfn.git_state`` ``dirty``) gets: ``allow``,
    ``warn`` (decided as any other, the warning in the decision's ``warning``) or ``refuse``
    (``UncommittedModel``, the stage's choice in team mode). Errors raise before the alias
    moves, and before any tag is written.
    """
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    limits = dict(budgets or {})
    if runtime_budget_ms is not None:
        limits[RUNTIME_FIGURE] = runtime_budget_ms
        runtime_budget_ms = float(runtime_budget_ms)
    for figure, limit in list(limits.items()):
        limit = float(limit)
        if not (limit > 0 and math.isfinite(limit)):
            raise ValueError(f"the budget of {figure} must be a positive number, got {limit}")
        limits[figure] = limit
    version = str(int(version))
    client = _client()
    # fail fast on an unknown candidate, and on one the policy refuses (nothing written)
    warning = uncommitted_check(client.get_model_version(registered_name, version),
                                uncommitted)

    with _lock(client, registered_name, lock, lock_timeout_s) as held:
        failpoints.hit("promote.locked")  # where tests hold a promotion (else a no-op)
        cand = client.get_model_version(registered_name, version)
        champ = _champion(client, registered_name, alias)  # re-read inside the lock
        promoted, reason = _decide(cand, champ, gate_metric, margin, limits,
                                   higher_is_better)
        decision: dict[str, Any] = {
            "promoted": promoted,
            "reason": reason,
            "registered_model": registered_name,
            "alias": alias,
            "candidate_version": int(cand.version),
            "champion_version": int(champ.version) if champ is not None else None,
            "candidate_figures": figures_of(cand),
            "champion_figures": figures_of(champ) if champ is not None else {},
            "gate_metric": gate_metric,
            "margin": margin,
            "higher_is_better": bool(higher_is_better),
            "runtime_budget_ms": runtime_budget_ms,
            "budgets": limits,
            "lock": held.kind,
            "decided_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if warning:
            decision["warning"] = warning
        if promoted:
            held.check()
            client.set_registered_model_alias(registered_name, alias, version)
        prefix = PROMOTION_PREFIX
        for key, value in {
            "decision": "promoted" if promoted else "rejected",
            "reason": reason,
            "compared_to": str(decision["champion_version"]) if champ is not None else "none",
            "gate_metric": gate_metric,
            "margin": repr(margin),
            "runtime_budget_ms": "none" if runtime_budget_ms is None else repr(runtime_budget_ms),
            "budgets": json.dumps(limits, sort_keys=True),
            "decided_at": decision["decided_at"],
        }.items():
            client.set_model_version_tag(registered_name, version, prefix + key, value)
    return decision
