"""Stage `tune` (experiments/dvc.yaml, not part of the default `dvc repro`): an Optuna study
over the training hyper-parameters declared in ``params.yaml``'s ``tune:`` section.

Each trial trains with ``train`` + ``tune.base`` (a short budget) + the sampled values (via
``rlfn.train.engine.train``, on ``data/patches/x<scale>.arrow`` when the pipeline made it, else
on ``train.hr_dir``) in ``<tune.trials_dir>/<study>/<trial number>``, reports its validation
Y-PSNR at every validation (``trial.report(psnr, step=iteration)``) and is stopped early when
``tune.pruner`` says so. The study maximises ``tune.metric`` (``val_psnr``: the final
validation PSNR, or ``best_val_psnr``).

Storage and resume. The study lives in ``tune.storage``, any SQLAlchemy URL (default the
SQLite file ``optuna.db`` in the project; ``postgresql://...`` to share one study between
several machines: run this command on each). Rerunning resumes the same study
(``load_if_exists``). ``tune.n_trials`` is the study's total target of *finished* trials
(COMPLETE + PRUNED): a resumed study runs only the missing ones, and a complete study runs
none (it just rewrites the outputs). Failed trials (a crash, a diverged loss, a killed
process) do not count, so a rerun replaces them. ``tune.timeout_s`` bounds one invocation
(0 = none). Each trial's draws come from the sampler's seed plus the trial's number (trial
numbers are never reused): a resumed run does not replay the first run's draws, and several
processes sharing one study (team mode: ``RLFN_OPTUNA_STORAGE`` on PostgreSQL) never draw the
same values.

Killed processes. Trials are watched by Optuna's heartbeat (``RDBStorage(heartbeat_interval=
tune.heartbeat_s, grace_period=tune.grace_s)``): a RUNNING trial whose heartbeat is older
than ``grace_s`` is marked FAIL (and its MLflow run KILLED) when the next trial starts, by any
worker. Live trials of other workers are never touched, which marking every RUNNING trial
failed on start would break. A dead trial still inside its grace period blocks nothing: it
does not count toward ``n_trials`` and the pruner only compares against COMPLETE trials.

Outputs: ``tune.best_out`` (``train: {key: value}`` of the best COMPLETE trial, ready to
merge: ``python -m pipeline.tune --apply`` writes it into ``params.yaml``'s ``train:``
section, keeping comments and formatting) and ``tune.out`` (metrics: best value, best trial,
trial counts by state). MLflow: the stage run (nested under the repro's parent run) holds one
nested run per trial with its params, its curves (``val_psnr`` per iteration) and its
final state as the tag ``optuna.state`` (COMPLETE / PRUNED / FAIL).

Bad input is refused with one ``error:`` line before any work starts: an unreachable storage
(the URL is named, its password hidden), an empty or unknown search space entry, an unknown
sampler or pruner, a key that is not a training setting.

Modules: ``spec`` (the ``tune:`` section checked into a ``TuneSpec``; ``TuneError``, a
``rlfn.errors.ConfigError`` naming the key, e.g. ``tune.space.lr``), ``study`` (the storage,
the objective and the Prefect flow ``tune``, entrypoint ``pipeline.tune:tune``), ``apply``
(``--apply``), ``cli`` (``main``; ``python -m pipeline.tune`` runs it).
"""

from __future__ import annotations

from .apply import apply_best, merge_train_text
from .cli import main
from .spec import TuneError, TuneSpec, load_spec, mask_url
from .study import open_storage, tune

__all__ = ["TuneError", "TuneSpec", "load_spec", "open_storage", "mask_url", "tune",
           "apply_best", "main", "merge_train_text"]
