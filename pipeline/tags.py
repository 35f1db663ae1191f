"""The project's MLflow tag vocabulary, each key written once: what the stages, trials and
retrains tag their runs with (``pipeline.tracking``), what a registered model and its versions
are tagged with (``pipeline.mlflow_registry``), and the tags of a version's training dataset.
Run tags keep their historical names (users' ``search_runs`` filters name them); version and
model tags are all ``rlfn.*``. This module imports nothing: it ships with the model's code."""

from __future__ import annotations

# -- run tags ---------------------------------------------------------------------------------
REPRO_ID = "rlfn.repro_id"      # every run of one `dvc repro` (its parent run's too)
KIND = "rlfn.kind"              # repro | stage | trial | retrain
DVC_STAGE = "dvc_stage"         # the DVC stage a run belongs to
GIT_COMMIT = "git_commit"       # HEAD, "-dirty" when tracked files had changes
PARAMS_HASH = "params_hash"     # sha256 (16 hex) of the params section the run read
PARENT_RUN = "mlflow.parentRunId"
ABLATION = "rlfn.ablation"      # an ablation's name (pipeline.ablate)
RETRAIN_REF = "rlfn.retrain.ref"
GIT_STATE = "rlfn.git_state"    # clean | outputs-only | dirty | unknown (tracking.git_state)
GIT_CHANGED = "rlfn.git_changed"  # the tracked paths that differ from HEAD and are no stage's
                                  # output (code, params, dvc.yaml), comma-separated, bounded
EXP_NAME = "rlfn.exp.name"      # a `dvc exp run`'s experiment (DVC_EXP_NAME)
EXP_BASELINE = "rlfn.exp.baseline"  # the commit it derives from (DVC_EXP_BASELINE_REV)
EXP_REF = "rlfn.exp.ref"        # its git ref: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>
FLOW_RUN = "rlfn.prefect.flow_run_id"  # the Prefect flow run a stage's run belongs to

# -- model version tags -------------------------------------------------------------------------
V_SCALE = "rlfn.scale"
V_MODEL = "rlfn.model"
V_STAGE = "rlfn.stage"                  # the training stage (1-3) the weights came from
V_WEIGHTS_SHA256 = "rlfn.weights_sha256"
V_RUN_ID = "rlfn.run_id"
V_GIT_COMMIT = "rlfn.git_commit"
V_GIT_DIRTY = "rlfn.git_dirty"
V_GIT_STATE = GIT_STATE                 # the run's, copied (same names on runs and versions)
V_GIT_CHANGED = GIT_CHANGED
V_EXP_NAME = EXP_NAME
V_EXP_BASELINE = EXP_BASELINE
V_EXP_REF = EXP_REF
V_GIT_COMMITTED = "rlfn.git_committed"  # a dirty version's code found in this commit later
                                        # (promote under `dvc repro` of that commit)
V_PARAMS_HASH = "rlfn.params_hash"
V_REPRO_ID = "rlfn.repro_id"
V_REPRO_RUN_ID = "rlfn.repro_run_id"
V_DVC_STAGE = "rlfn.dvc_stage"
FIGURE_PREFIX = "rlfn.figure."          # rlfn.figure.<metric>: what `promote` compares
DATA_PREFIX = "rlfn.data."              # rlfn.data.<item>.{path,md5}: the data it saw
SET_PSNR_FIGURE = "psnr_y.{}"           # figure: PSNR-Y on one evaluate.sets set (the canary's)
V_SERVE_CANARY = "rlfn.serve.canary"    # passed | failed: the serving rollout's canary
V_SERVE_REASON = "rlfn.serve.canary_reason"  # what it measured against what, or why it failed

# -- registered-model tags ----------------------------------------------------------------------
PROMOTION_PREFIX = "rlfn.promotion."    # rlfn.promotion.<field>: the last promotion decision
LEASE = "rlfn.promotion.lease"          # the promotion lock's lease (holder, expiry)

# -- dataset-input tags (the manifest logged as the training dataset) --------------------------
DATASET_PREFIX = "rlfn."                # rlfn.rows, rlfn.rows.usable, rlfn.patches.images, ...
