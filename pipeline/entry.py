"""The one entry contract of every command of the pipeline: the stages (``main(flow)``),
``python -m pipeline.retrain``, ``python -m pipeline.tune`` and ``python -m pipeline.ablate``
(``run_entry``). In that order: logging and torch's threads, the settings (a bad one is one
``error:`` line, exit 2, before Prefect or MLflow start), the command's own checks, team
mode's servers (reachable and ours), then the work. An ``RLFNError`` it raises is one
``error:`` line and its exit code (2 configuration, 1 data or a failed step); a server lost
mid-work is one line naming it (exit 1), but a Prefect server lost once the stage's work was
done and recorded (``tracking.work_done``: only its flow run's end is unrecorded) is one
warning and exit 0; anything else a traceback and 1."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from pipeline.dvcops import dvc_ancestor
from pipeline.services import check_services, describe_failure
from pipeline.settings import Settings, load_settings
from rlfn.errors import RLFNError
from rlfn.log import get_logger
from rlfn.log import setup as setup_logging
from rlfn.threads import configure_threads

__all__ = ["main", "run_entry", "log"]

log = get_logger("pipeline")


def run_entry(work: Callable[[], int | None], *, check: Callable[[], Any] | None = None,
              services: bool = True, load_aware_threads: bool = True) -> int:
    """Run ``work()`` under the entry contract (module docstring): ``check()`` first (the
    command's settings and its own checks, nothing started yet), then the servers, then
    ``work()`` (its return value when an int, else 0). Returns the exit code."""
    setup_logging()
    try:
        log.debug(f"torch: {configure_threads(0, load_aware=load_aware_threads)}")
        if check is not None:
            check()
        if services:
            check_services()  # team mode's servers: reachable and ours, before any work
        with _repro_prefect_server():
            code = work()
    except RLFNError as e:
        log.error(str(e))
        return e.exit_code
    except Exception as e:  # a server lost mid-work: one line naming it, after the retries
        line = describe_failure(e)
        if line is None:
            raise
        if line.startswith("Prefect server"):
            from pipeline.tracking import work_done

            done = work_done()
            if done:  # only the flow run's end went unrecorded: the work and its records stand
                log.warning(f"{line}; the work of {done} was done and recorded before, so "
                            "it stands (its Prefect flow run stays as the server last saw "
                            "it: the stack's automation marks it CRASHED)")
                return 0
        log.error(line)
        return 1
    return code if isinstance(code, int) else 0  # a flow's result (a dict, ...) is not a code


def main(flow: Callable[..., Any], *args: Any,
         check: Callable[[Settings], Any] | None = None, load_aware_threads: bool = True) -> int:
    """A stage's command line: load and check the settings (and ``check(settings)``, a stage's
    own checks that need no Prefect: backends, ...), then ``flow(*args, settings=settings)``
    under ``run_entry``. Returns the exit code: ``sys.exit(main(flow))``. torch's threads:
    ``rlfn.threads`` (training stages: ``load_aware_threads=False``)."""
    box: dict[str, Settings] = {}

    def prepare() -> None:
        box["settings"] = load_settings()
        if check is not None:
            check(box["settings"])

    def work() -> None:
        flow(*args, settings=box["settings"])

    return run_entry(work, check=prepare, load_aware_threads=load_aware_threads)


@contextlib.contextmanager
def _repro_prefect_server() -> Iterator[None]:
    """Under ``dvc repro`` without ``PREFECT_API_URL``: the stages of one repro share one
    Prefect server (``pipeline.repro_server``) instead of starting a temporary one each."""
    rid = None if os.environ.get("PREFECT_API_URL") else dvc_ancestor()
    url = None
    if rid:
        from pipeline import repro_server

        url = repro_server.server_url(rid, int(rid.split("-")[1]))
    if not url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        yield
