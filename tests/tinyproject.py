"""Tiny projects for the tests that run the pipeline for real: the stage and flow-run names of
``dvc repro``, the params that make the whole pipeline train in minutes on 2 cores
(``tiny_params``; ``tiny_clone``: a team-stack test's clone made tiny, committed), and a
minimal tuning project (``tune_project``). Used by test_pipeline.py, test_stack_repro.py,
test_tune.py, test_stack.py, the chaos tests and test_hosts_team.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import yaml
from PIL import Image

from imagefiles import rgb

TRAIN_STAGES = ["train_stage@1", "train_stage@2", "train_stage@3"]
DVC_STAGES = ["prepare", "degrade", "patches", *TRAIN_STAGES, "evaluate", "pareto_official",
              "profile", "promote"]
FLOW_RUNS = ["prepare", "degrade", "patches", "train-stage1", "train-stage2", "train-stage3",
             "evaluate", "pareto_official", "profile", "promote"]

PREFECT_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        flows = {f.id: f.name for f in await client.read_flows(limit=200)}
        runs = await client.read_flow_runs(limit=200)
        print(json.dumps([{"flow": flows.get(r.flow_id), "name": r.name,
                           "state": r.state_type.value} for r in runs]))

asyncio.run(main())
"""


def tiny_params(p: Path, iterations: int = 4, int8: bool = True) -> None:
    prm = yaml.safe_load(p.read_text())
    assert prm["profile"]["pareto"]["extra_backends"] == ["int8"]  # the default
    if not int8:  # its calibration and quantization take ~30 s a model
        prm["profile"]["pareto"]["extra_backends"] = []
    prm["data"]["min_size"] = 64
    prm["train"].update(model="rlfn_ntire", iterations=iterations, batch_size=2, patch_size=64,
                        val_every=2, checkpoint_every=2, log_every=1, num_workers=0,
                        epoch_iterations=4, val_max_images=2)
    prm["profile"]["max_images"] = 2
    prm["profile"]["warmup"] = 1
    prm["profile"]["pareto"].update(max_images=1, warmup=1)
    prm["profile"]["pareto"]["sets"] = {"Set5": "data/sample/Set5",
                                        "B100": "../shared/data/benchmarks/BSD100/x4/HR"}
    prm["evaluate"]["sets"] = {"Set5": "data/sample/Set5", "Set14": "data/sample/Set14"}
    assert list(prm["train_stages"]) == ["1", "2", "3"]
    for st in prm["train_stages"].values():  # the stages' own lengths give way to the tiny one
        for k in ("iterations", "lr_step"):
            st.pop(k, None)
    assert prm["train_launch"]["ddp"] is True  # the default: each stage under torchrun
    p.write_text(yaml.safe_dump(prm, sort_keys=False))


TUNE_TRAIN = dict(model="rlfn_ntire", scale=4, hr_dir="hr", val_hr_dir="val", iterations=30,
             batch_size=2, patch_size=64, lr=1e-3, val_every=10, checkpoint_every=10,
             log_every=5, num_workers=0, threads=1, epoch_iterations=10, amp="off", seed=0)


TRAIN_IMAGES = 4  # as test_pipeline's copy: enough for the tiny params, fast to prepare


def tiny_clone(clone: Path, wrap: Callable[[list[str]], list[str]] = list) -> None:
    """A team-stack test's clone made tiny: the tiny params (no int8 backend) and
    ``TRAIN_IMAGES`` training images, committed with every other change of its working tree
    (the stack's ``prepare`` hook; a test host's clone from ``hosts.install_project`` holds the
    working tree under test). ``wrap`` makes the command line each git command runs as (a
    test host's ``Host.argv``: as the host's user, who owns the clone)."""
    tiny_params(clone / "params.yaml", int8=False)
    extra = sorted((clone / "data" / "sample" / "train").glob("*.png"))[TRAIN_IMAGES:]
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    if extra:
        subprocess.run(wrap([*git, "rm", "-q", *[str(p) for p in extra]]), check=True,
                       timeout=60)
    subprocess.run(wrap([*git, "add", "-A"]), check=True, timeout=60)
    subprocess.run(wrap([*git, "commit", "-q", "--allow-empty", "-m",
                         "tiny params for the stack tests"]), check=True, timeout=60)


def tune_project(d: Path, tune: dict, train: dict | None = None) -> Path:
    """A folder with 4 training and 2 validation images and a params.yaml of ``TUNE_TRAIN``
    (+ ``train``) and a ``tune`` section (``tune``) on a SQLite study: what
    ``python -m pipeline.tune`` needs, in seconds."""
    d.mkdir(parents=True, exist_ok=True)
    for sub, n, seed in (("hr", 4, 0), ("val", 2, 10)):
        (d / sub).mkdir(exist_ok=True)
        for i in range(n):
            Image.fromarray(rgb(96, 88, seed=seed + i)).save(d / sub / f"img{i}.png")
    prm = {"train": {**TUNE_TRAIN, **(train or {})},
           "mlflow": {"db": "mlflow.db", "artifacts": "mlartifacts", "experiment": "rlfn"},
           "tune": {"study": "tiny", "storage": "sqlite:///optuna.db", "heartbeat_s": 1,
                    "grace_s": 2, **tune}}
    text = yaml.safe_dump(prm, sort_keys=False)
    # comments that --apply must keep
    text = "# tiny test params\n" + text.replace("  lr: 0.001\n", "  lr: 0.001    # the lr\n")
    (d / "params.yaml").write_text(text)
    return d
