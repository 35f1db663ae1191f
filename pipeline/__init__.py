"""The pipeline: one Prefect flow per DVC stage (``python -m pipeline.<stage>``), settings from
``params.yaml`` (``pipeline.settings``), one entry contract for every command
(``pipeline.entry``), runs and models in MLflow (``pipeline.tracking``, ``pipeline.tags``,
``pipeline.mlflow_registry``), DVC from inside a stage (``pipeline.dvcops``)."""

import os as _os
from pathlib import Path as _Path

# Before Prefect or MLflow read their settings: project-local Prefect state, no telemetry
# (there is no network, and Prefect's temporary server races its own SQLite for the telemetry
# row, printing errors that are not ours), no artifact progress bars in logs, and the
# library's log records ("rlfn" logger) in a flow run's Prefect log.
_os.environ.setdefault("PREFECT_HOME", str(_Path(__file__).resolve().parents[1] / ".prefect"))
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rlfn")
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Each stage run by `dvc repro` starts Prefect's temporary server; on a busy 2-core machine it
# can take longer than Prefect's default 20 s to answer.
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The stages log through the "rlfn" logger before and after their flow runs too: no warning.
_os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Before torch loads: waiting OpenMP threads sleep rather than spin (rlfn.threads: on a busy
# machine a spinning thread burns the core the thread it waits for needs).
from rlfn.threads import set_wait_policy_default as _set_wait_policy_default  # noqa: E402

_set_wait_policy_default()

# A flow run that a worker started (a deployment's): Prefect set up its logging before it
# imported this package, so the default above came too late there, and the library's lines
# (each line of `dvc repro`, a stage's `error:` or `note:`) reached neither the worker's log
# nor the flow run's log on the server (found by chaos case 4 across hosts). They go where a
# stage's go under `dvc repro`: plain lines on stderr (the worker's log), and Prefect's
# handlers for extra loggers (the server's flow-run log).
if _os.environ.get("PREFECT__FLOW_RUN_ID"):
    import logging as _logging

    from rlfn.log import setup as _setup_log

    _rlfn = _setup_log()
    for _h in _logging.getLogger("prefect.extra").handlers:
        if _h not in _rlfn.handlers:
            _rlfn.addHandler(_h)
