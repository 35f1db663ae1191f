"""pipeline.entry's contract when a server is lost mid-work (the chaos case 4 found the
Prefect half of it): the failure is one line naming the server, and a Prefect server lost
only after the stage's work was done and recorded lets the stage stand. The lost server is a
real closed port: httpx's own ConnectError, whose message names no URL; or a real nginx in
front of one (the team stack off loopback, chaos case 4 across hosts): its ``502 Bad Gateway``
page, whose HTML the line once carried over several lines."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from pipeline import entry, tracking
from pipeline.services import describe_failure
from prereq import ROOT, unavailable
from servers import free_port, stop_group


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


@pytest.fixture
def prefect_behind_a_dead_upstream(tmp_path, monkeypatch) -> str:
    """PREFECT_API_URL of a real nginx (the stack's own config head) whose upstream, the
    Prefect server, is not there: every request answered with nginx's 502 page."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from stack import nginx
    from stack.core import StackError

    try:
        exe = nginx.nginx_bin()
    except StackError as e:
        unavailable(str(e))
    d = tmp_path / "nginx"
    nginx.prepare_dir(d)
    port = free_port(2)  # port + 1: the upstream, reserved and never listened on
    conf = d / "nginx.conf"
    conf.write_text(nginx.head(d, "test_entry: a proxy whose upstream is gone") + f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{port + 1}; }}
    }}
}}
""")
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(d), "-e", "stderr"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 30  # a bound on waiting for nginx's start
        while True:
            try:
                if httpx.get(f"{api}/ready").status_code == 502:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        monkeypatch.setenv("PREFECT_API_URL", api)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
        yield api
    finally:
        stop_group(proc)


def test_a_prefect_server_gone_behind_its_proxy_is_one_line(prefect_behind_a_dead_upstream,
                                                            monkeypatch, capsys):
    api = prefect_behind_a_dead_upstream

    def work() -> None:  # the flow run's end, proposed through the proxy
        with httpx.Client() as c:
            c.post(f"{api}/flow_runs/x/set_state", json={}).raise_for_status()

    monkeypatch.setattr(tracking, "_DONE", "train_stage@1 (MLflow run abc FINISHED)")
    assert entry.run_entry(work, services=False) == 0
    lines = [x for x in _lines(capsys) if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"note: Prefect server at {api}: answered HTTP 502 during the stage; now answered HTTP "
        "502: 502 Bad Gateway (its proxy's page: the server behind it does not answer) to GET "
        "/ready"), lines
    assert "the work of train_stage@1 (MLflow run abc FINISHED) was done and recorded" in \
        lines[0], lines
