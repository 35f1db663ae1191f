"""Model registry: log an RLFN as an MLflow pyfunc, register it, and promote it only if better.

(Named ``mlflow_registry`` so that it does not clash with ``rlfn.models.registry``, the model
architectures' registry.)

Modules
-------
* ``pyfunc``: the ``RLFNPyfunc`` PythonModel, its input checks, the example image, the
  signature, the pip requirements and the code shipped with a logged model.
* ``model_code``: the model's code file (MLflow "models from code"; not imported here).
* ``versions``: figures and tags, ``log_and_register``, ``version_weights``.
* ``promotion``: the decision (``_decide``), ``promote`` and ``champion``.
* ``locks``: the critical section around a promotion: ``_FileLock``, ``_Lease``,
  ``LeaseLost`` and the choice between them.

Public API
----------
* ``RLFNPyfunc``: the ``mlflow.pyfunc.PythonModel``. Input: a uint8 ``(H, W, 3)`` RGB image
  (or an ``(N, H, W, 3)`` batch of equal sizes), output the super-resolved uint8 image(s),
  exactly ``rlfn.upscale.upscale_array``'s output; or a DataFrame with a column ``image`` of
  base64-encoded PNG/JPEG bytes (one image a row; what ``mlflow models serve`` gets as
  ``{"dataframe_records": [{"image": ...}]}``), output a DataFrame with ``image`` (base64 PNG,
  byte for byte what ``rlfn upscale`` writes) and ``notes`` (the conversions applied). Inputs
  are checked by the model (``InvalidInput``: a ``ValueError`` and an ``MlflowException`` with
  ``INVALID_PARAMETER_VALUE``, which the server answers with HTTP 400); the logged signature
  declares the params only (MLflow's input schemas are tensors or columns, not both). Params
  (optional): ``tile`` (LR pixels; -1 = auto: ``rlfn.upscale.auto_tile``, 512 above 1 MP as
  the CLI does, 0 = never) and ``overlap`` (64).
* ``log_and_register(weights, scale, *, registered_name=None, tags=None, figures=None,
  data=None)``: inside the active run, logs the safetensors file (artifact ``weights/``) and
  the pyfunc (artifact ``model``) as models from code (``python_model`` is ``model_code.py``:
  nothing pickled), registers it under ``registered_name or f"rlfn-x{scale}"`` with its tags
  and a description in one call and returns the ``ModelVersion``. ``data`` (``{name: path}``)
  is the stage's input data, recorded with DVC md5s; a ``manifest`` is also logged as the
  run's MLflow dataset input. The pyfunc carries its own code (``code/pipeline`` with just this
  package, ``code/rlfn``) and an explicit pip requirement list, so it loads anywhere those
  packages are installed.
* ``promote(registered_name, version, *, gate_metric="mean_psnr_y", margin=0.0,
  runtime_budget_ms=None, budgets=None, higher_is_better=True, uncommitted="allow")``: the
  promotion decision (a dict), which moves the ``champion`` alias only if the candidate is
  better. ``uncommitted="refuse"`` raises ``UncommittedModel`` (nothing moved or written) for
  a candidate whose ``rlfn.git_state`` is ``dirty`` (code or params in no commit); ``warn``
  adds a ``warning`` to the decision.
* ``champion(registered_name)``: the champion ``ModelVersion`` or ``None``.
* ``version_weights(registered_name, dest)``: every version with its weights downloaded.

Tags on a model version
-----------------------
* ``rlfn.figure.<name>`` (e.g. ``rlfn.figure.mean_psnr_y``, ``rlfn.figure.runtime_ms_cpu``):
  the figures passed to ``log_and_register``, as ``repr(float)``. Promotion reads a
  champion's figures from these tags alone.
* ``rlfn.scale``, ``rlfn.model`` (architecture name), ``rlfn.weights_sha256``,
  ``rlfn.run_id``, plus the caller's ``tags``.
* Lineage (``pipeline.lineage`` reads them back: ``rlfn lineage``): ``rlfn.data.<name>.path`` and
  ``.md5`` (DVC md5) for each ``data`` item and for ``weights``; copied from the run's tags
  (``pipeline.tracking.stage_run``): ``rlfn.git_commit`` (``-dirty`` when tracked files had
  changes) and ``rlfn.git_dirty``, ``rlfn.git_state`` (``clean``, ``outputs-only``,
  ``dirty``, ``unknown``) and ``rlfn.git_changed`` (the non-output paths that differed),
  ``rlfn.params_hash``, ``rlfn.repro_id``, ``rlfn.repro_run_id`` (the repro's parent run),
  ``rlfn.dvc_stage``; inside ``dvc exp run``, ``rlfn.exp.name``, ``rlfn.exp.baseline``,
  ``rlfn.exp.ref``.
* Written by ``promote`` on the candidate: ``rlfn.promotion.decision`` (``promoted`` or
  ``rejected``), ``rlfn.promotion.reason``, ``rlfn.promotion.compared_to`` (the champion's
  version, or ``none``), ``rlfn.promotion.gate_metric``, ``rlfn.promotion.margin``,
  ``rlfn.promotion.runtime_budget_ms`` (``none`` when unset), ``rlfn.promotion.budgets``
  (JSON ``{figure: maximum}``), ``rlfn.promotion.decided_at`` (UTC, ISO 8601).

Promotion rules
---------------
The alias moves to the candidate only when (a) there is no champion yet, or the candidate's
gate figure beats the champion's by MORE than ``margin`` (strictly: equal is not better;
"beats" is "lower" with ``higher_is_better=False``), and (b) for every budget (``budgets``:
``{figure: maximum}``, e.g. ``runtime_rel``, the CPU time relative to a reference model timed
in the same run, which means the same on every machine, or ``flops``;
``runtime_budget_ms`` is the budget of ``runtime_ms_cpu``), the candidate's figure exists
and is ``<=`` its maximum. A candidate
without a finite gate figure is refused (it could never be compared later); a champion
without one is not replaced automatically (nothing shows the candidate is better; move the
alias by hand). A candidate that already is the champion is "not promoted" (nothing moves).
Any exception (unknown version, unreadable registry, lock timeout, lost lease) propagates
*before* the alias is touched, so a failed run never unsets or downgrades the champion.

Lock protocol (read champion -> compare -> move alias is one critical section)
------------------------------------------------------------------------------
Two promotions racing each other must not both win, so the section is serialised, and the
champion is (re-)read only inside it:

* Local registry (``sqlite:///PATH`` or a ``file:``/plain-path store): an exclusive
  ``fcntl.flock`` on ``PATH.promote.lock`` (next to the database / store directory), polled
  without blocking until ``lock_timeout_s`` (then ``TimeoutError``). The OS drops the lock
  when its holder dies, so a crashed promotion never leaves a stale lock. (POSIX local file
  systems; not for a database on NFS shared between hosts.)
* Any other registry (``http(s)://`` tracking server, databases, ...): a lease kept as the
  registered-model tag ``rlfn.promotion.lease`` = JSON ``{"token", "expires", "owner"}``
  (``expires``: the writer's wall clock + ``LEASE_TTL_S``). To acquire: read the tag; if it
  is absent or expired, write a fresh unique token, wait ``LEASE_SETTLE_S``, read it back, and
  hold the lease only if the token is still ours (of several writers the last one wins; the
  others see a foreign token; a write the server refuses, as MLflow's non-atomic tag upsert
  may when two arrive at once, counts as lost). Otherwise retry with jittered exponential
  backoff until ``lock_timeout_s`` (then ``TimeoutError``, nothing changed). Just before
  moving the alias the holder reads the tag again and aborts (``LeaseLost``) unless the token
  is still its own and not within ``LEASE_GUARD_S`` of expiry. Release: delete the tag if it
  still holds our token; a lease that is never released (crash) expires after
  ``LEASE_TTL_S`` and is overwritten. Assumptions: a registry has no compare-and-set, so this
  is a lease, not a proof: it holds while one request's round trip (read -> write) is well
  under ``LEASE_SETTLE_S`` and the clients' clocks agree to well within ``LEASE_TTL_S``.

This package imports nothing else from ``pipeline`` (it is shipped alone with every logged
model, see ``pyfunc._stage_code``).
"""

from __future__ import annotations

from .locks import LEASE_TAG, LeaseLost
from .promotion import CHAMPION_ALIAS, PROMOTION_PREFIX, UncommittedModel, champion, promote
from .pyfunc import IMAGE_COLUMN, MIN_INPUT_SIZE, InvalidInput, RLFNPyfunc, example_image
from .versions import FIGURE_PREFIX, figure_tags, figures_of, log_and_register, version_weights

__all__ = ["RLFNPyfunc", "log_and_register", "promote", "champion", "figures_of",
           "figure_tags", "LeaseLost", "CHAMPION_ALIAS", "FIGURE_PREFIX", "PROMOTION_PREFIX",
           "LEASE_TAG", "MIN_INPUT_SIZE", "example_image", "version_weights", "InvalidInput",
           "IMAGE_COLUMN", "UncommittedModel"]
