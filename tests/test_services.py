"""pipeline/services.py against a real ``mlflow server`` whose database goes away under it (the
chaos case 1's finding, at the size of a unit test): the server stays up and answers its
health probe, but every query is HTTP 503 ``TEMPORARILY_UNAVAILABLE`` with the database
driver's error. A stage's check before any work, and the one line for a failure mid-stage,
name the database as what is down, not the server as unreachable; once the database is back,
the check passes and the line says the server answers again.

The database is SQLite here (``NullPool``: every request opens the file, so replacing it with a
folder makes each one fail as a lost database would); PostgreSQL SIGKILLed under a stage is
``tests/test_chaos_postgres.py``."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipeline.services import ServiceError, check_services, describe_failure
from servers import mlflow_server


@pytest.fixture
def gone(tmp_path, monkeypatch):
    """(url, run id, take the database away, put it back) for a real server with one run."""
    db = tmp_path / "server.db"
    with mlflow_server(tmp_path, db, env={"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"}) as url:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_SERVER_CERT_PATH"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a bound, not a clock
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("db-gone"))
        away = tmp_path / "away.db"

        def take() -> None:
            db.rename(away)
            db.mkdir()  # SQLite cannot open a folder: "unable to open database file"

        def back() -> None:
            db.rmdir()
            away.rename(db)

        yield url, client, run.info.run_id, take, back


def test_a_tracking_server_whose_database_is_gone_is_named(gone):
    url, client, run_id, take, back = gone
    assert check_services() == [f"MLflow {url}"]
    client.log_metric(run_id, "loss", 1.0, step=0)  # the database there: it works
    take()
    with pytest.raises(Exception) as e:
        client.log_metric(run_id, "loss", 0.5, step=1)
    assert "too many 503 error responses" in str(e.value), e.value  # what the client sees
    line = describe_failure(e.value)
    assert line is not None and line.startswith(
        f"MLflow tracking server at {url}: answered HTTP 503 to each of the client's retries"
        " during the stage; now its database is not available"), line
    assert "TEMPORARILY_UNAVAILABLE" in line and "OperationalError" in line, line
    with pytest.raises(ServiceError) as checked:  # a stage started now stops before any work
        check_services()
    assert str(checked.value).startswith(f"MLflow tracking server at {url}: its database is "
                                         "not available (GET /api/2.0/mlflow/experiments"), \
        checked.value
    back()
    assert check_services() == [f"MLflow {url}"]
    assert "; now it answers again" in describe_failure(e.value)
    client.log_metric(run_id, "loss", 0.5, step=1)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5]


def test_a_server_error_that_is_not_a_lost_database_is_not_named_so(gone):
    url, client, run_id, take, back = gone
    with pytest.raises(Exception) as e:
        client.get_run("0" * 32)  # 404: an answer, not a lost server
    assert describe_failure(e.value) is None
