"""`python -m pipeline.tune` for real: Optuna studies in SQLite, the Prefect flow, MLflow's
SQLite store, each in a temporary project with its own params.yaml and tiny images. No mocks:
pruning really happens, a study process is really SIGKILLed and resumed, the best params are
merged back into a params file, and bad input is refused before any work.

Every ``python -m pipeline.tune`` a test starts runs in its own session (process group) and
carries a marker in its environment: a timeout or a kill takes the whole group (the study and
the Prefect temporary server it started), and afterwards nothing carrying the marker may be
left running."""

from __future__ import annotations

import json
import os
import signal
import uuid
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from servers import processes_with_env
from tinyproject import tune_project

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GOOD_LR, BAD_LR = 3e-3, 1e-7  # 10 iterations: ~20 dB vs ~7 dB (no learning at all)


def _env(project: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               PREFECT_HOME=str(project / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")
    env.pop("RLFN_REPRO_ID", None)
    env.pop("RLFN_PARAMS", None)
    return env


MARK = "RLFN_TUNE_TEST_MARK"  # in the environment of every process a test starts


def _marked(mark: str) -> dict[int, str]:
    """pid -> command line of the live processes whose environment has ``MARK=mark``."""
    return processes_with_env(MARK, mark)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (started with start_new_session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its session's group id is its pid
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _kill_marked(mark: str) -> dict[int, str]:
    """SIGKILL every live process carrying ``mark``; returns them."""
    left = _marked(mark)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _no_survivors(mark: str, grace_s: float = 10.0) -> None:
    """Fail if a process started under ``mark`` is still running after ``grace_s`` (a normal
    exit stops Prefect's temporary server within ~5 s); those are killed first."""
    deadline = time.monotonic() + grace_s
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _kill_marked(mark)
    assert not left, f"processes left running: {left}"


def _start(project: Path, *args: str, **kw) -> tuple[subprocess.Popen, str]:
    """``python -m pipeline.tune *args`` in ``project``, in a new session, marked."""
    mark = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tune", *args], cwd=project,
                            env={**_env(project), MARK: mark}, start_new_session=True, **kw)
    return proc, mark


def _run(project: Path, *args: str, check: bool = True, timeout: int = 300):
    proc, mark = _start(project, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"pipeline.tune {args} ran past {timeout} s:\n{out[-3000:]}\n"
                             f"{err[-6000:]}") from None
    finally:
        if proc.poll() is None:  # interrupted: nothing it started outlives the test
            _kill_group(proc)
            _kill_marked(mark)
    _no_survivors(mark)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and r.returncode != 0:
        raise AssertionError(f"pipeline.tune {args} failed ({r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def _study(project: Path, name: str = "tiny"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def _states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials():
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _mlflow_runs(project: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("rlfn")
    return mlflow, mlflow.search_runs([exp.experiment_id], output_format="list")


# ------------------------------------------------------------------ a real study, pruned
@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """4 trials: the first two enqueued (a good lr, then a hopeless one that the median
    pruner must stop at its first validation), then two sampled ones."""
    d = tune_project(tmp_path_factory.mktemp("tune") / "proj", {
        "n_trials": 4, "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "space": {"lr": {"type": "categorical", "choices": [GOOD_LR, BAD_LR]},
                  "batch_size": {"type": "int", "low": 2, "high": 3}},
        "enqueue": [{"lr": GOOD_LR, "batch_size": 2}, {"lr": BAD_LR, "batch_size": 2}]})
    t0 = time.perf_counter()
    r = _run(d)
    print(f"\ntiny study of 4 trials: {time.perf_counter() - t0:.1f} s")
    (d / "run.log").write_text(r.stdout + r.stderr)
    return d


# Timeouts (pytest-timeout counts fixture setup): the `pruned` study takes ~35 s on a
# 2-core machine (its own limit: 300 s); whichever test of the three runs first pays for it.
@pytest.mark.timeout(600)
def test_study_prunes_a_hopeless_trial(pruned):
    study = _study(pruned)
    trials = study.get_trials()
    states = _states(study)
    assert len(trials) == 4 and states.get("PRUNED", 0) >= 1, states
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 4
    t0, t1 = trials[0], trials[1]
    assert t0.params == {"lr": GOOD_LR, "batch_size": 2} and t0.state.name == "COMPLETE"
    assert sorted(t0.intermediate_values) == [10, 20, 30]  # reported at every validation
    assert t1.params["lr"] == BAD_LR and t1.state.name == "PRUNED"
    assert list(t1.intermediate_values) == [10]  # stopped at its first validation
    assert t1.intermediate_values[10] < t0.intermediate_values[10] - 5
    for t in trials:  # every trial on the hopeless lr is pruned
        assert t.params["lr"] != BAD_LR or t.state.name == "PRUNED", t
    # a pruned trial stopped early: no final weights; no checkpoint is kept for any trial
    trial_dirs = pruned / "tune" / "trials" / "tiny"
    assert not (trial_dirs / "0001" / "model.safetensors").exists()
    assert (trial_dirs / "0000" / "model.safetensors").exists()
    assert not list(trial_dirs.glob("*/checkpoint"))
    summary = json.loads((pruned / "metrics" / "tune.json").read_text())
    assert summary["states"]["PRUNED"] == states["PRUNED"]
    assert summary["best_trial"] == study.best_trial.number
    assert summary["best_value"] == pytest.approx(study.best_value)
    assert summary["n_trials_target"] == 4


@pytest.mark.timeout(600)
def test_trials_are_nested_mlflow_runs_under_the_stage_run(pruned):
    mlflow, runs = _mlflow_runs(pruned)
    stage = [r for r in runs if r.data.tags.get("dvc_stage") == "tune"
             and r.data.tags.get("rlfn.kind") == "stage"]
    assert len(stage) == 1 and stage[0].info.status == "FINISHED"
    parent = [r for r in runs if r.info.run_id == stage[0].data.tags["mlflow.parentRunId"]]
    assert parent and parent[0].data.tags["rlfn.kind"] == "repro"
    trials = [r for r in runs if r.data.tags.get("rlfn.kind") == "trial"]
    assert len(trials) == 4
    study = {t.number: t for t in _study(pruned).get_trials()}
    client = mlflow.MlflowClient()
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == stage[0].info.run_id
        n = int(r.data.tags["optuna.trial"])
        assert r.data.tags["optuna.state"] == study[n].state.name
        assert study[n].user_attrs["mlflow_run_id"] == r.info.run_id
        assert float(r.data.params["lr"]) == study[n].params["lr"]
        assert int(r.data.params["batch_size"]) == study[n].params["batch_size"]
        assert r.info.status == "FINISHED"  # COMPLETE and PRUNED both end normally
        hist = client.get_metric_history(r.info.run_id, "val_psnr")
        assert sorted(m.step for m in hist) == sorted(study[n].intermediate_values)
    assert stage[0].data.metrics["trials_pruned"] >= 1


@pytest.mark.timeout(600)
def test_best_params_merge_back_into_params_yaml(pruned):
    best = yaml.safe_load((pruned / "tune" / "best_params.yaml").read_text())
    study = _study(pruned)
    assert best == {"train": study.best_params}
    before = (pruned / "params.yaml").read_text()
    dry = _run(pruned, "--apply", "--dry-run")
    assert "train.lr: 0.001 -> 0.003" in dry.stdout
    assert "params.yaml: would change" in dry.stdout
    assert (pruned / "params.yaml").read_text() == before  # a dry run writes nothing
    r = _run(pruned, "--apply")
    assert "params.yaml: changed" in r.stdout
    assert "train.lr: 0.001 -> 0.003" in r.stdout
    after = (pruned / "params.yaml").read_text()
    merged = yaml.safe_load(after)
    assert {k: merged["train"][k] for k in best["train"]} == best["train"]
    assert {k: v for k, v in merged.items() if k != "train"} == \
        {k: v for k, v in yaml.safe_load(before).items() if k != "train"}
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert ("  lr: 0.001    # the lr", "  lr: 0.003    # the lr") in changed  # comment kept
    assert len(changed) == 1 + (best["train"]["batch_size"] != 2)
    assert len(after.splitlines()) == len(before.splitlines())
    assert after.startswith("# tiny test params\n")  # and everything else kept byte for byte
    again = _run(pruned, "--apply")
    assert "already up to date" in again.stdout
    assert (pruned / "params.yaml").read_text() == after


def test_merge_keeps_the_real_params_yaml_byte_for_byte():
    from pipeline.tune import merge_train_text

    text = (ROOT / "params.yaml").read_text()
    out = merge_train_text(text, {"lr": 0.0012, "model": "rlfn_s", "contrastive_weight": 0.2})
    a, b = text.splitlines(), out.splitlines()
    assert len(b) == len(a) + 1  # the new key: one added line
    diff = [line for line in b if line not in a]
    assert len(diff) == 3 and "  contrastive_weight: 0.2" in diff
    assert any(line.startswith("  lr: 0.0012 ") and line.endswith("# paper: 5e-4")
               for line in diff)
    lr_old = next(line for line in a if line.startswith("  lr: "))
    lr_new = next(line for line in b if line.startswith("  lr: "))
    assert lr_old.index("#") == lr_new.index("#")  # the comment keeps its column
    new, old = yaml.safe_load(out), yaml.safe_load(text)
    assert new["train"] == {**old["train"], "lr": 0.0012, "model": "rlfn_s",
                            "contrastive_weight": 0.2}
    assert {k: v for k, v in new.items() if k != "train"} == \
        {k: v for k, v in old.items() if k != "train"}


# ------------------------------------------------------------------ SIGKILL, then resume
def _db_trials(db: Path) -> list[tuple]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("select t.number, t.state, t.study_id, exists(select 1 from "
                             "trial_intermediate_values v where v.trial_id = t.trial_id) "
                             "from trials t order by t.number").fetchall()
    except sqlite3.Error:
        return []


@pytest.mark.timeout(900)  # ~60 s on 2 cores; its own limits: 300 s to the kill, 300 s resumed
def test_killed_study_resumes(tmp_path):
    d = tune_project(tmp_path / "proj", {
        "n_trials": 4, "sampler": {"name": "random", "seed": 1}, "pruner": {"name": "none"},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 4e-3, "log": True}}},
        train={"iterations": 40})
    db = d / "optuna.db"
    log = open(tmp_path / "first_run.log", "wb")
    proc, mark = _start(d, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            rows = _db_trials(db)
            done = [r for r in rows if r[1] in ("COMPLETE", "PRUNED")]
            running = [r for r in rows if r[1] == "RUNNING" and r[3]]  # mid-training
            if done and running:
                break
            time.sleep(0.05)
        assert proc.poll() is None, ("the study ended before it could be killed:\n"
                                     + (tmp_path / "first_run.log").read_text()[-5000:])
        started = _marked(mark)
        # the study process and the Prefect temporary server it started: the kill must take both
        assert any("prefect.server.api.server" in cmd for cmd in started.values()), started
        _kill_group(proc)  # SIGKILL, as a crash or the OOM killer would
        _no_survivors(mark, grace_s=5.0)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        _kill_marked(mark)  # whatever happened above, nothing of it outlives the test
    before = {t.number: t for t in _study(d).get_trials()}
    killed = [n for n, t in before.items() if t.state.name == "RUNNING"]
    finished = {n: t for n, t in before.items() if t.state.name in ("COMPLETE", "PRUNED")}
    assert len(killed) == 1 and finished, before
    study_id = _study(d)._study_id
    time.sleep(2.5)  # past tune.grace_s since the dead trial's last heartbeat

    r = _run(d)
    assert f"{4 - len(finished)} trial(s) to run" in r.stdout + r.stderr
    import optuna

    study = _study(d)
    assert study._study_id == study_id  # the same study, resumed
    assert optuna.get_all_study_names(f"sqlite:///{db}") == ["tiny"]
    after = {t.number: t for t in study.get_trials()}
    for n, t in finished.items():  # the trials from before are kept as they were
        assert after[n].state == t.state and after[n].value == t.value
        assert after[n].datetime_complete == t.datetime_complete
    assert after[killed[0]].state.name == "FAIL"  # the stale RUNNING trial
    states = _states(study)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 4, states
    assert states.get("RUNNING", 0) == 0 and states["FAIL"] == 1
    # the resumed run did not replay the first run's draws
    lrs = [t.params["lr"] for t in study.get_trials() if "lr" in t.params]
    assert len(set(lrs)) == len(lrs)
    summary = json.loads((d / "metrics" / "tune.json").read_text())
    assert summary["states"]["FAIL"] == 1 and summary["n_trials"] == len(after)
    mlflow, runs = _mlflow_runs(d)
    dead = mlflow.MlflowClient().get_run(after[killed[0]].user_attrs["mlflow_run_id"])
    assert dead.info.status == "KILLED" and dead.data.tags["optuna.state"] == "FAIL"
    stages = [r for r in runs if r.data.tags.get("rlfn.kind") == "stage"]
    assert len(stages) == 2  # one stage run per invocation, trials nested in their own
    trials = [r for r in runs if r.data.tags.get("rlfn.kind") == "trial"]
    assert len(trials) == len(after)


# ------------------------------------------------------------------ bad input, no work
GOOD_SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}}
BAD = [  # (tune: settings, the key the error names, the message)
    ({"storage": "postgresql://user:s3cret@127.0.0.1:1/db"}, "tune.storage",
     "tune.storage: cannot open postgresql://user:***@127.0.0.1:1/db ("),
    ({"storage": "sqlite:///no/such/dir/optuna.db"}, "tune.storage",
     "tune.storage: cannot open sqlite:///no/such/dir/optuna.db: directory no/such/dir"),
    ({"storage": "sqlite:///:memory:"}, "tune.storage", "in-memory database cannot be resumed"),
    ({"space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-4}}}, "tune.space.lr",
     "tune.space.lr: empty search space (low 0.001 >= high 0.0001)"),
    ({"space": {"batch_size": {"type": "int", "low": 4, "high": 4}}}, "tune.space.batch_size",
     "tune.space.batch_size: empty search space"),
    ({"space": {"patch_size": {"type": "categorical", "choices": []}}}, "tune.space.patch_size",
     "tune.space.patch_size: empty search space"),
    ({"space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}, "tune.space.lr",
     "tune.space.lr: unknown type 'loguniform'"),
    ({"space": {"learning_rate": GOOD_SPACE["lr"]}}, "tune.space.learning_rate",
     "tune.space.learning_rate: 'learning_rate' is not a tunable training setting"),
    ({"space": {"patch_size": {"type": "categorical", "choices": [64, 66]}}},
     "tune.space.patch_size", "tune.space.patch_size: value 66 is not a valid training setting"),
    ({"space": {"lr": {"type": "float", "low": 0, "high": 1e-3, "log": True}}}, "tune.space.lr",
     "tune.space.lr: log scale needs low > 0"),
    ({"space": {"lr": {"type": "float", "low": "x", "high": 1e-3}}}, "tune.space.lr.low",
     "tune.space.lr.low: expected a number, got 'x'"),
    ({"space": {}}, "tune.space", "tune.space: empty"),
    ({"base": {"lr": 1e-3}}, "tune.space", "tune.space: lr also set in tune.base"),
    ({"pruner": {"name": "medain"}}, "tune.pruner", "tune.pruner: unknown pruner 'medain'"),
    ({"pruner": {"name": "median", "n_startup": 2}}, "tune.pruner",
     "tune.pruner: unknown option(s) n_startup for median"),
    ({"sampler": {"name": "bayes"}}, "tune.sampler", "tune.sampler: unknown sampler 'bayes'"),
    ({"metric": "loss"}, "tune.metric", "tune.metric: unknown metric 'loss'"),
    ({"base": {"epochs": 3}}, "tune.base", "tune.base: 'epochs' is not a training setting"),
    ({"n_trials": 0}, "tune.n_trials", "tune.n_trials: must be >= 1"),
    ({"enqueue": [{"batch_size": 4}]}, "tune.enqueue[0]",
     "tune.enqueue[0]: batch_size not in tune.space"),
    ({"nonsense": 1}, "tune", "tune: unknown key(s) nonsense"),
]


@pytest.mark.parametrize("over,key,message", BAD, ids=[f"{k}-{i}" for i, (_, k, _) in
                                                        enumerate(BAD)])
def test_bad_input_is_refused_before_any_work(tmp_path, monkeypatch, over, key, message):
    from pipeline.tune import TuneError, load_spec, open_storage
    from rlfn.errors import ConfigError

    d = tune_project(tmp_path / "proj", {"space": GOOD_SPACE, **over})
    monkeypatch.chdir(d)
    with pytest.raises(TuneError) as e:
        open_storage(load_spec("params.yaml"))
    assert message in str(e.value)
    assert e.value.where == key  # the error names the key at fault
    assert isinstance(e.value, ConfigError) and e.value.exit_code == 2  # bad configuration
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)
    assert not (d / "optuna.db").exists() and not (d / "tune").exists()


@pytest.mark.timeout(300)  # ~5 s; the run's own limit is 120 s
def test_cli_bad_input_one_line_error_no_work(tmp_path):
    d = tune_project(tmp_path / "proj", {"space": GOOD_SPACE,
                                     "storage": "postgresql://user:s3cret@127.0.0.1:1/db"})
    r = _run(d, check=False, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: tune.storage: cannot open postgresql://user:***@127.0.0.1:1/db ("), r.stderr
    assert "s3cret" not in r.stdout + r.stderr
    for p in ("mlflow.db", "optuna.db", "tune", "metrics", ".prefect/prefect.db"):
        assert not (d / p).exists(), p  # refused before Prefect, MLflow or Optuna started


def test_prefect_entrypoint_loads_the_flow():
    """prefect.yaml's entrypoint ``pipeline.tune:tune`` names the package; it must load the
    flow itself (not the package, nor a module of it)."""
    from prefect.flows import Flow, load_flow_from_entrypoint

    entry = {d["name"]: d["entrypoint"] for d in
             yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert "pipeline.tune:tune" in entry.values(), entry
    flow = load_flow_from_entrypoint("pipeline.tune:tune")
    assert isinstance(flow, Flow) and flow.name == "rlfn-tune"
    import pipeline.tune

    assert flow is pipeline.tune.tune


# ------------------------------------------------------------------ the DVC stage
@pytest.mark.timeout(600)  # ~2 s; four dvc calls of at most 120 s each
def test_dvc_stage_is_outside_the_default_pipeline(tmp_path):
    for rel in ("dvc.yaml", "experiments/dvc.yaml", "params.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())

    def dvc(*args: str) -> str:
        r = subprocess.run(["dvc", *args], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    dvc("init", "--no-scm", "-q")
    assert "tune" not in dvc("stage", "list")  # `dvc repro` never runs it
    listed = dvc("stage", "list", "experiments/dvc.yaml")
    assert listed.startswith("experiments/dvc.yaml:tune") and "tune/best_params.yaml" in listed
    status = json.loads(dvc("status", "experiments/dvc.yaml", "--json"))
    deps = {k: v for d in status["experiments/dvc.yaml:tune"] for k, v in
            d.get("changed deps", {}).items()}
    assert deps.get("params.yaml") == "new"  # the root params.yaml (wdir: ..)
    stage = yaml.safe_load((ROOT / "experiments" / "dvc.yaml").read_text())["stages"]["tune"]
    outs = [next(iter(o)) for o in stage["outs"] + stage["metrics"]]
    assert "optuna.db" not in " ".join(outs)  # the resumable state is not a DVC out
