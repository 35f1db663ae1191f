"""pipeline/tracking.py against a real MLflow store (SQLite): a run whose end was lost with the
tracking server is journaled and recorded by the next stage that reaches the same server.
(The whole path, a real server killed mid-stage, is tests/test_stack_repro.py's.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

mlflow = pytest.importorskip("mlflow")

from pipeline import tracking  # noqa: E402


@pytest.fixture
def journal(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "UNTERMINATED", tmp_path / ".rlfn" / "unterminated.jsonl")
    return tracking.UNTERMINATED


@pytest.fixture(scope="module")
def _store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")  # one SQLite store for the module (its migrations)
    uri = f"sqlite:///{d}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(d / "art").as_uri())
    return client, uri, exp


@pytest.fixture
def store(_store, journal):
    return _store


def test_journaled_ends_are_recorded_once_for_their_server_only(store):
    client, uri, exp = store
    lost = client.create_run(exp).info.run_id
    parent = client.create_run(exp).info.run_id
    ended = client.create_run(exp).info.run_id
    client.set_terminated(ended, "FINISHED")  # recorded meanwhile by someone else: left as is
    elsewhere = client.create_run(exp).info.run_id  # (an id this store also has)
    other = {"run_id": elsewhere, "status": "FAILED", "uri": "http://other:5000"}
    for rid in (lost, parent, ended):
        tracking._journal_append({"run_id": rid, "status": "FAILED", "uri": uri})
    tracking._journal_append(other)
    with open(tracking.UNTERMINATED, "a") as fh:
        fh.write('{"run_id": "torn')  # a process killed mid-append
    assert client.get_run(lost).info.status == "RUNNING"

    assert sorted(tracking.settle_unterminated(client, uri)) == sorted([lost, parent])
    assert client.get_run(lost).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(ended).info.status == "FINISHED"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another server's entry
    # the other server's entry stays for a stage that reaches it; the torn line is gone
    assert [json.loads(x) for x in tracking.UNTERMINATED.read_text().splitlines()] == [other]
    assert tracking.settle_unterminated(client, uri) == []


def test_an_empty_journal_is_removed(store):
    client, uri, exp = store
    rid = client.create_run(exp).info.run_id
    tracking._journal_append({"run_id": rid, "status": "KILLED", "uri": uri})
    assert tracking.settle_unterminated(client, uri) == [rid]
    assert client.get_run(rid).info.status == "KILLED"
    assert not tracking.UNTERMINATED.exists()


def test_a_lost_end_is_journaled_only_once_the_server_is_lost(journal, monkeypatch):
    """A real client of a server that is not there (a closed loopback port, no retries)."""
    dead = "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(dead)
    try:
        client = mlflow.MlflowClient(tracking_uri=dead)
        with pytest.raises(Exception):  # not lost (yet): an error like any other
            tracking._terminate(client, "r1", "FAILED")
        assert not tracking.UNTERMINATED.exists()
        monkeypatch.setattr(tracking, "_LOST", True)
        tracking._terminate(client, "r1", "FAILED")
    finally:
        mlflow.set_tracking_uri(None)
    assert json.loads(tracking.UNTERMINATED.read_text()) == {
        "run_id": "r1", "status": "FAILED", "uri": dead}
