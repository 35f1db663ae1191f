"""pipeline.mlflow_registry against real MLflow: a SQLite store in a temporary folder (one per
module, each test with its own registered model) and, for the lease path, a real
``mlflow server``."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pipeline` is not an installed package; spawned children
    sys.path.insert(0, str(ROOT))  # inherit this sys.path

import mlflow  # noqa: E402  (a required dependency of the pipeline: no skip)
from mlflow.exceptions import MlflowException  # noqa: E402

import rlfn.upscale  # noqa: E402
from pipeline import mlflow_registry  # noqa: E402
from pipeline.mlflow_registry import champion, locks, log_and_register, promote  # noqa: E402
from rlfn.models import build_model  # noqa: E402
from rlfn.upscale import upscale_array  # noqa: E402
from rlfn.weights import WeightsError, load_model, save_model  # noqa: E402
from servers import mlflow_server, restore_tracking_uri  # noqa: E402

PSNR, RT = "mean_psnr_y", "runtime_ms_cpu"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    return save_model(build_model("rlfn_ntire", 4),
                      tmp_path_factory.mktemp("w") / "rlfn_ntire_x4.safetensors",
                      provenance={"test": "registry"})


@pytest.fixture(scope="module", autouse=True)
def _restore_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in os.environ (which
    ``pipeline.tracking.tracking_uri`` reads): put both back for the modules run after this."""
    yield from restore_tracking_uri()


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An empty SQLite tracking database with MLflow's tables made (that takes ~6 s), copied
    for the local store and for the server rather than migrated twice."""
    db = tmp_path_factory.mktemp("template") / "empty.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_db):
    """One SQLite tracking store for the module's tests (each uses its own model names)."""
    d = tmp_path_factory.mktemp("mlflow")
    shutil.copyfile(empty_db, d / "mlflow.db")
    uri = f"sqlite:///{d}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("registry-tests", artifact_location=(d / "art").as_uri())
    yield {"uri": uri, "dir": d, "experiment_id": exp}


@pytest.fixture
def local(store):
    mlflow.set_tracking_uri(store["uri"])  # a server test may have pointed it elsewhere
    return store


def _register(store, weights, name, psnr=None, rt=None):
    figures = {k: v for k, v in ((PSNR, psnr), (RT, rt)) if v is not None}
    with mlflow.start_run(experiment_id=store["experiment_id"]):
        mv = log_and_register(weights, 4, registered_name=name, figures=figures,
                              tags={"test": name})
    return int(mv.version)


def _champ_version(name):
    mv = champion(name)
    return None if mv is None else int(mv.version)


def _tags(name, version):
    return mlflow.MlflowClient().get_model_version(name, str(version)).tags


# --------------------------------------------------------------------------------------------
# Rules


def test_first_model_is_promoted_and_tagged(local, weights):
    name = "first"
    assert champion(name) is None  # no such registered model yet
    v1 = _register(local, weights, name, psnr=30.0, rt=100.0)
    assert champion(name) is None
    tags = _tags(name, v1)
    assert float(tags["rlfn.figure.mean_psnr_y"]) == 30.0
    assert float(tags["rlfn.figure.runtime_ms_cpu"]) == 100.0
    assert tags["rlfn.scale"] == "4" and tags["rlfn.model"] == "rlfn_ntire"
    assert tags["test"] == name and len(tags["rlfn.weights_sha256"]) == 64
    # the safetensors file itself is a run artifact
    run_files = [f.path for f in mlflow.MlflowClient().list_artifacts(tags["rlfn.run_id"],
                                                                       "weights")]
    assert run_files == ["weights/rlfn_ntire_x4.safetensors"]

    d = promote(name, v1, runtime_budget_ms=200.0)
    assert d["promoted"] is True and "no champion" in d["reason"]
    assert d["candidate_version"] == v1 and d["champion_version"] is None
    assert d["candidate_figures"] == {PSNR: 30.0, RT: 100.0} and d["champion_figures"] == {}
    json.dumps(d)  # the stage writes it to a metrics file
    assert _champ_version(name) == v1
    tags = _tags(name, v1)
    assert tags["rlfn.promotion.decision"] == "promoted"
    assert tags["rlfn.promotion.compared_to"] == "none"
    assert tags["rlfn.promotion.reason"] == d["reason"]
    assert float(tags["rlfn.promotion.runtime_budget_ms"]) == 200.0


def test_better_candidate_is_promoted(local, weights):
    name = "better"
    v1 = _register(local, weights, name, psnr=30.0)
    assert promote(name, v1)["promoted"]
    v2 = _register(local, weights, name, psnr=30.2)
    d = promote(name, v2)
    assert d["promoted"] is True, d["reason"]
    assert d["champion_version"] == v1 and d["champion_figures"] == {PSNR: 30.0}
    assert _champ_version(name) == v2
    assert _tags(name, v2)["rlfn.promotion.compared_to"] == str(v1)


@pytest.mark.parametrize("psnr", [29.9, 30.0], ids=["worse", "equal"])
def test_worse_or_equal_candidate_is_refused(local, weights, psnr):
    name = f"notbetter-{psnr}"
    v1 = _register(local, weights, name, psnr=30.0)
    promote(name, v1)
    v2 = _register(local, weights, name, psnr=psnr)
    d = promote(name, v2, margin=0.0)
    assert d["promoted"] is False and "does not beat" in d["reason"]
    assert _champ_version(name) == v1
    tags = _tags(name, v2)
    assert tags["rlfn.promotion.decision"] == "rejected"
    assert tags["rlfn.promotion.compared_to"] == str(v1)


def test_margin_is_strict(local, weights):
    name = "margin"
    v1 = _register(local, weights, name, psnr=30.0)
    promote(name, v1)
    v2 = _register(local, weights, name, psnr=30.05)
    assert promote(name, v2, margin=0.1)["promoted"] is False  # within the margin
    assert _champ_version(name) == v1
    v3 = _register(local, weights, name, psnr=30.25)
    assert promote(name, v3, margin=0.1)["promoted"] is True  # beyond it
    assert _champ_version(name) == v3


def test_runtime_budget(local, weights):
    name = "budget"
    v1 = _register(local, weights, name, psnr=30.0, rt=100.0)
    promote(name, v1, runtime_budget_ms=150.0)
    slow = _register(local, weights, name, psnr=35.0, rt=151.0)  # much better, too slow
    d = promote(name, slow, runtime_budget_ms=150.0)
    assert d["promoted"] is False and "over the runtime budget" in d["reason"]
    unknown = _register(local, weights, name, psnr=35.0)  # no runtime figure, budget set
    d = promote(name, unknown, runtime_budget_ms=150.0)
    assert d["promoted"] is False and "no runtime_ms_cpu" in d["reason"]
    assert _champ_version(name) == v1
    ok = _register(local, weights, name, psnr=30.5, rt=150.0)  # on the budget is within it
    assert promote(name, ok, runtime_budget_ms=150.0)["promoted"] is True
    assert _champ_version(name) == ok


def test_lower_is_better_and_missing_gate_figure(local, weights):
    name = "lower"
    v1 = _register(local, weights, name, psnr=30.0, rt=100.0)
    promote(name, v1, gate_metric=RT, higher_is_better=False)
    v2 = _register(local, weights, name, psnr=10.0, rt=90.0)
    assert promote(name, v2, gate_metric=RT, higher_is_better=False)["promoted"] is True
    v3 = _register(local, weights, name, rt=80.0)  # no PSNR figure: cannot be compared on it
    d = promote(name, v3)
    assert d["promoted"] is False and "no finite mean_psnr_y" in d["reason"]
    assert _champ_version(name) == v2


def test_failures_leave_the_champion_alone(local, weights):
    name = "failures"
    v1 = _register(local, weights, name, psnr=30.0)
    promote(name, v1)
    v2 = _register(local, weights, name, psnr=40.0)  # would win
    with pytest.raises(MlflowException):
        promote(name, 99)  # no such version
    assert _champ_version(name) == v1
    # Another promotion holds the lock: this one times out before touching the alias.
    import fcntl

    lock_path = locks._local_lock_path(local["uri"])
    assert lock_path == Path(local["dir"]) / "mlflow.db.promote.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError):
            promote(name, v2, lock_timeout_s=0.5)
        fcntl.flock(fh, fcntl.LOCK_UN)
    assert _champ_version(name) == v1
    assert "rlfn.promotion.decision" not in _tags(name, v2)
    with pytest.raises(ValueError):
        promote(name, v2, margin=-1)
    assert _champ_version(name) == v1
    assert promote(name, v2)["promoted"] is True  # and once the lock is free it works


def test_log_and_register_checks_before_logging(local, weights):
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_and_register(weights, 4, registered_name="checks")
    with mlflow.start_run(experiment_id=local["experiment_id"]):
        with pytest.raises(WeightsError, match="x4 model"):
            log_and_register(weights, 2, registered_name="checks")
        with pytest.raises(ValueError, match="finite"):
            log_and_register(weights, 4, registered_name="checks", figures={PSNR: float("nan")})
    assert mlflow.MlflowClient().search_registered_models("name = 'checks'") == []


def _built(store, weights, name, psnr, state, changed=None, legacy_dirty=None):
    """A version as a stage registers it, built in the git ``state`` (``clean``,
    ``outputs-only``, ``dirty``: the tags ``pipeline.tracking.stage_run`` gives its run,
    tests/test_lineage.py checks those); ``legacy_dirty``: a version from before
    ``rlfn.git_state``, with ``rlfn.git_dirty`` only."""
    if legacy_dirty is not None:
        tags = {"rlfn.git_commit": "c0ffee" + ("-dirty" if legacy_dirty else ""),
                "rlfn.git_dirty": str(legacy_dirty).lower()}
    else:
        tags = {"rlfn.git_state": state,
                "rlfn.git_commit": "c0ffee" + ("" if state == "clean" else "-dirty")}
    if changed:
        tags["rlfn.git_changed"] = changed
    with mlflow.start_run(experiment_id=store["experiment_id"]):
        mv = log_and_register(weights, 4, registered_name=name, figures={PSNR: psnr}, tags=tags)
    return int(mv.version)


def test_uncommitted_candidate_is_refused_when_the_policy_says_so(local, weights):
    """``uncommitted="refuse"`` (the promote stage's choice in team mode): a candidate built
    from code or params in no commit is refused with one line naming it, its commit, what
    differed and the setting that allows it; the champion stays, nothing is written on the
    candidate. ``outputs-only`` (a repro of a commit) and ``clean`` pass; ``warn`` decides
    as usual and says so."""
    from pipeline.mlflow_registry import UncommittedModel
    from rlfn.errors import exit_code

    name = "uncommitted"
    v1 = _built(local, weights, name, 30.0, "clean")
    assert promote(name, v1, uncommitted="refuse")["promoted"] is True
    v2 = _built(local, weights, name, 31.0, "dirty", changed="params.yaml, pipeline/train.py")
    with pytest.raises(UncommittedModel) as e:
        promote(name, v2, uncommitted="refuse")
    msg = str(e.value)
    assert "\n" not in msg and exit_code(e.value) == 1
    for needle in (f"models:/{name}/{v2}", "c0ffee-dirty", "params.yaml, pipeline/train.py",
                   "no commit", "promote.allow_uncommitted: true"):
        assert needle in msg, (needle, msg)
    assert _champ_version(name) == v1  # never moved, never downgraded
    assert not any(k.startswith("rlfn.promotion.") for k in _tags(name, v2))
    old = _built(local, weights, name, 31.0, None, legacy_dirty=True)  # before git_state
    with pytest.raises(UncommittedModel):
        promote(name, old, uncommitted="refuse")
    assert _champ_version(name) == v1

    v3 = _built(local, weights, name, 31.5, "outputs-only")
    d = promote(name, v3, uncommitted="refuse")
    assert d["promoted"] is True and "warning" not in d and _champ_version(name) == v3

    v4 = _built(local, weights, name, 32.0, "dirty", changed="params.yaml")
    d = promote(name, v4, uncommitted="warn")  # one machine: decided as usual, and said
    assert d["promoted"] is True and _champ_version(name) == v4
    assert "no commit" in d["warning"] and f"models:/{name}/{v4}" in d["warning"]
    with pytest.raises(ValueError, match="uncommitted must be one of"):
        promote(name, v4, uncommitted="sometimes")


def test_promote_stage_policy_follows_team_mode_and_the_setting(monkeypatch):
    """The promote stage refuses an uncommitted candidate in team mode (a tracking server)
    unless ``promote.allow_uncommitted``, or unless it runs under ``dvc repro`` in a checkout
    whose code and params are committed (DVC found the stages before it up to date with
    them); on one machine (SQLite) it warns."""
    import pipeline.promote as stage
    from pipeline.settings import load_settings

    s = load_settings(ROOT / "params.yaml")
    assert s.promote.allow_uncommitted is False  # off by default
    allowed = s.model_copy(update={"promote": s.promote.model_copy(
        update={"allow_uncommitted": True})})
    dirty = {"commit": "c0ffee-dirty", "state": "dirty", "changed": ["params.yaml"]}
    repro = {"commit": "c0ffee-dirty", "state": "outputs-only", "changed": []}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.team.example:55000")
    assert stage.uncommitted_policy(s, dirty) == ("refuse", "")
    assert stage.uncommitted_policy(allowed, dirty)[0] == "warn"
    assert stage.uncommitted_policy(s, repro) == ("refuse", "")  # not run by dvc repro
    monkeypatch.setattr(stage, "dvc_ancestor", lambda: "dvc-1-2")  # as under `dvc repro`
    assert stage.uncommitted_policy(s, dirty) == ("refuse", "")
    policy, note = stage.uncommitted_policy(s, repro)
    assert policy == "warn" and "commit c0ffee's now" in note, note
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert stage.uncommitted_policy(s, dirty)[0] == "warn"


def _race_worker(uri, name, version, barrier, results):
    import mlflow as mlf

    from pipeline.mlflow_registry import promote as promote_

    mlf.set_tracking_uri(uri)
    mlf.MlflowClient().get_registered_model(name)  # connect before the start line
    barrier.wait(timeout=120)
    try:
        results.put(("ok", version, promote_(name, version)))
    except BaseException as e:  # reported to the parent, which fails the test
        results.put(("error", version, repr(e)))


def test_two_racing_processes_cannot_both_win(local, weights):
    name = "race"
    v1 = _register(local, weights, name, psnr=30.0)
    promote(name, v1)
    a = _register(local, weights, name, psnr=31.0)
    b = _register(local, weights, name, psnr=31.0)  # equally good: only the first may win
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(local["uri"], name, v, barrier, results))
             for v in (a, b)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert sorted(v for _, v, _ in got) == sorted((a, b)), got
    assert all(status == "ok" for status, _, _ in got), got
    decisions = {v: d for _, v, d in got}
    winners = [v for v, d in decisions.items() if d["promoted"]]
    assert len(winners) == 1, [d["reason"] for d in decisions.values()]
    (winner,) = winners
    (loser,) = {a, b} - {winner}
    assert _champ_version(name) == winner
    assert decisions[winner]["champion_version"] == v1
    assert decisions[loser]["champion_version"] == winner  # re-read inside the lock
    assert "does not beat" in decisions[loser]["reason"]


# --------------------------------------------------------------------------------------------
# The pyfunc


def test_pyfunc_from_registry_matches_upscale_array(local, weights, tmp_path, monkeypatch):
    v = _register(local, weights, None, psnr=28.0, rt=50.0)  # default name: rlfn-x4
    assert promote("rlfn-x4", v)["promoted"]
    model = mlflow.pyfunc.load_model("models:/rlfn-x4@champion")
    net = load_model(weights).model
    img = mlflow_registry.example_image(21)[:, :19]  # odd, non-square
    out = model.predict(img)
    ref = upscale_array(net, img)
    assert out.dtype == np.uint8 and out.shape == (84, 76, 3)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(model.predict(img, params={"tile": 0}), ref)
    with pytest.raises(ValueError, match="too small"):
        model.predict(np.zeros((14, 40, 3), np.uint8))
    with pytest.raises(MlflowException):  # the signature wants uint8
        model.predict(img.astype(np.float32))
    batch = np.stack([img, img[::-1].copy()])  # batches: through the Python model itself
    got = model.unwrap_python_model().predict(None, batch)
    assert got.shape == (2, 84, 76, 3)
    np.testing.assert_array_equal(got[0], ref)
    np.testing.assert_array_equal(got[1], upscale_array(net, img[::-1].copy()))

    # Tiling: the signature's params reach upscale_array, and tile=-1 (the default) follows
    # rlfn.upscale.auto_tile, the library's one auto-tile policy (its threshold lowered here so
    # that a small image crosses it). Tiled output differs from whole, so each case shows.
    big = mlflow_registry.example_image(48)[:, :42]
    whole, tiled = upscale_array(net, big), upscale_array(net, big, tile=24, overlap=4)
    assert not np.array_equal(whole, tiled)
    np.testing.assert_array_equal(model.predict(big, params={"tile": 24, "overlap": 4}), tiled)
    monkeypatch.setattr(rlfn.upscale, "AUTO_TILE", 24)
    monkeypatch.setattr(rlfn.upscale, "AUTO_TILE_PIXELS", big.shape[0] * big.shape[1] - 1)
    np.testing.assert_array_equal(model.predict(big, params={"overlap": 4}), tiled)
    np.testing.assert_array_equal(model.predict(big, params={"tile": 0}), whole)
    monkeypatch.setattr(rlfn.upscale, "AUTO_TILE_PIXELS", big.shape[0] * big.shape[1])
    np.testing.assert_array_equal(model.predict(big, params={"overlap": 4}), whole)

    # A fresh interpreter in another folder, without this checkout on its path, loads it too:
    # the model carries its code (a `pipeline` package holding only `mlflow_registry`, and
    # `rlfn`), and those copies are what it runs.
    np.save(tmp_path / "in.npy", img)
    script = """
import json, sys
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
m = mlflow.pyfunc.load_model("models:/rlfn-x4@champion")
np.save("out.npy", m.predict(np.load("in.npy")))
import pipeline, rlfn
print(json.dumps({name: sys.modules[name].__file__ for name in (
    "pipeline", "pipeline.mlflow_registry", "pipeline.mlflow_registry.pyfunc", "rlfn",
    "rlfn.upscale", "rlfn.weights")}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    r = subprocess.run([sys.executable, "-c", script, local["uri"]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ref)
    files = {k: Path(v).resolve() for k, v in json.loads(r.stdout.splitlines()[-1]).items()}
    code = files["pipeline"].parents[1]
    assert code.name == "code", files
    for name, f in files.items():
        assert f.is_relative_to(code) and not f.is_relative_to(ROOT), (name, f)
    shipped = {p.name for p in (code / "pipeline").iterdir()} - {"__pycache__"}
    # nothing else of pipeline/ but its tag vocabulary (a module that imports nothing)
    assert shipped == {"__init__.py", "mlflow_registry", "tags.py"}, shipped
    stage_glue = {"entry", "tracking", "dvcops", "settings", "services"}
    assert not stage_glue & {p.stem for p in (code / "pipeline").rglob("*.py")}


# --------------------------------------------------------------------------------------------
# A real tracking server: the lease path


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_db):
    d = tmp_path_factory.mktemp("server")
    shutil.copyfile(empty_db, d / "server.db")
    with mlflow_server(d) as url:
        yield url


def test_tracking_server_lease_path(server, weights):
    mlflow.set_tracking_uri(server)
    exp = mlflow.create_experiment("registry-server")
    client = mlflow.MlflowClient()
    name = "rlfn-x4"

    def register(psnr):
        with mlflow.start_run(experiment_id=exp):
            return int(log_and_register(weights, 4, figures={PSNR: psnr, RT: 80.0}).version)

    def lease():
        return client.get_registered_model(name).tags.get(mlflow_registry.LEASE_TAG)

    # Two promotions of equally good candidates racing, no champion yet: exactly one wins,
    # the other then compares against the winner (equal is not better).
    a, b = register(31.0), register(31.0)
    start, out = threading.Barrier(2), {}

    def race(v):
        start.wait(timeout=60)
        try:
            out[v] = promote(name, v, runtime_budget_ms=100.0)
        except BaseException as e:
            out[v] = e

    threads = [threading.Thread(target=race, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a promotion hung"
    assert set(out) == {a, b} and all(isinstance(x, dict) for x in out.values()), out
    assert {x["lock"] for x in out.values()} == {"lease"}
    winners = [v for v, x in out.items() if x["promoted"]]
    assert len(winners) == 1, [x["reason"] for x in out.values()]
    (loser,) = {a, b} - set(winners)
    assert out[winners[0]]["champion_version"] is None
    assert out[loser]["champion_version"] == winners[0]
    assert int(champion(name).version) == winners[0]
    assert lease() is None  # released

    # A live foreign lease blocks (timeout, nothing moved); an expired one is taken over.
    c = register(33.0)
    foreign = {"token": "someone-else", "expires": time.time() + 600, "owner": "other:1"}
    client.set_registered_model_tag(name, mlflow_registry.LEASE_TAG, json.dumps(foreign))
    with pytest.raises(TimeoutError, match="other:1"):
        promote(name, c, lock_timeout_s=1.0)
    assert int(champion(name).version) == winners[0]
    assert json.loads(lease())["token"] == "someone-else"  # not ours to delete
    foreign["expires"] = time.time() - 1  # its holder crashed long ago
    client.set_registered_model_tag(name, mlflow_registry.LEASE_TAG, json.dumps(foreign))
    d = promote(name, c)
    assert d["promoted"] and d["champion_version"] == winners[0]
    assert lease() is None

    # The champion loads back from the server's registry and predicts like the library.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    img = mlflow_registry.example_image(16)
    np.testing.assert_array_equal(model.predict(img),
                                  upscale_array(load_model(weights).model, img))
