"""pipeline.entry's contract when a server is lost mid-work (the chaos case 4 found the
Prefect half of it): the failure is one line naming the server, and a Prefect server lost
only after the stage's work was done and recorded lets the stage stand. The lost server is a
real closed port: httpx's own ConnectError, whose message names no URL."""

from __future__ import annotations

import httpx
import pytest

from pipeline import entry, tracking
from pipeline.services import describe_failure
from servers import free_port


@pytest.fixture
def prefect_gone(monkeypatch) -> str:
    """PREFECT_API_URL of a server that is not there (no MLflow server configured)."""
    api = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return api


def _lost(api: str) -> Exception:
    try:
        with httpx.Client() as c:
            c.post(f"{api}/flow_runs/x/set_state", json={})
    except httpx.ConnectError as e:
        return e
    raise AssertionError(f"{api} answered")


def test_a_lost_prefect_server_is_named_though_httpx_names_no_url(prefect_gone):
    e = _lost(prefect_gone)
    assert prefect_gone.split("//")[1].split("/")[0] not in str(e)  # what made it a traceback
    line = describe_failure(e)
    assert line is not None and line.startswith(f"Prefect server at {prefect_gone}: lost"), line
    try:  # also when another exception wraps it (raise ... from)
        raise RuntimeError("proposing the final state failed") from e
    except RuntimeError as wrapped:
        assert describe_failure(wrapped).startswith(f"Prefect server at {prefect_gone}"), \
            describe_failure(wrapped)


def _work(api: str):
    def work() -> None:
        raise _lost(api)
    return work


def _lines(capsys) -> list[str]:
    """What the entry printed on stderr (rlfn.log: ``note:`` / ``error:`` lines)."""
    return capsys.readouterr().err.splitlines()


def test_lost_during_the_work_fails_with_one_line(prefect_gone, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_DONE", None)
    assert entry.run_entry(_work(prefect_gone), services=False) == 1
    errors = [x for x in _lines(capsys) if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: Prefect server at {prefect_gone}: lost"), errors


def test_lost_after_the_work_was_recorded_lets_the_stage_stand(prefect_gone, monkeypatch,
                                                                capsys):
    monkeypatch.setattr(tracking, "_DONE", "train_stage@1 (MLflow run abc FINISHED)")
    assert entry.run_entry(_work(prefect_gone), services=False) == 0
    lines = _lines(capsys)
    assert not [x for x in lines if x.startswith("error:")], lines
    notes = [x for x in lines if x.startswith(f"note: Prefect server at {prefect_gone}: lost")]
    assert len(notes) == 1 and \
        "the work of train_stage@1 (MLflow run abc FINISHED) was done and recorded" in notes[0], \
        lines
