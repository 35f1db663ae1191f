"""The learning-rate schedules of the warm-start ablation: ``step`` (the paper's recipe, and its
slower-decay "e2000" variant) and ``cyclic`` (the paper's "clr": restarts within one run that
keeps the Adam state), their config checks, and a real run of each behaviour."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imagefiles import rgb
from rlfn.train.config import ConfigError, TrainConfig, load_config
from rlfn.train.engine import train
from rlfn.train.schedule import lr_at


def test_step_is_the_default_and_unchanged():
    c = TrainConfig(hr_dir="x")
    assert (c.lr_schedule, c.lr_cycle) == ("step", 0)
    assert [lr_at(c, i) for i in (0, 199_999, 200_000, 400_000, 999_999)] == [
        5e-4, 5e-4, 2.5e-4, 1.25e-4, 3.125e-5]


def test_slower_step_decay_is_just_another_lr_step():
    # "e2000": one run as long as three stages, halving less often
    c = TrainConfig(hr_dir="x", lr=1e-3, lr_step=30)
    assert [lr_at(c, i) for i in (0, 29, 30, 59, 60, 89)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4,
                                                             2.5e-4]


def test_cyclic_restarts_every_cycle_hand_computed():
    c = TrainConfig(hr_dir="x", lr=1e-3, lr_gamma=0.5, lr_step=4, lr_cycle=10,
                    lr_schedule="cyclic")
    want = {0: 1e-3, 3: 1e-3, 4: 5e-4, 7: 5e-4, 8: 2.5e-4, 9: 2.5e-4,  # cycle 1
            10: 1e-3, 13: 1e-3, 14: 5e-4, 19: 2.5e-4,                 # restart
            20: 1e-3, 25: 5e-4, 29: 2.5e-4, 30: 1e-3}
    assert {i: lr_at(c, i) for i in want} == want
    # a pure function of the iteration: the same value however often or in what order asked
    assert [lr_at(c, i) for i in (29, 4, 29)] == [2.5e-4, 5e-4, 2.5e-4]
    # the paper's scale: 3 cycles of 1e6 iterations, halving every 2e5 within each
    p = TrainConfig(hr_dir="x", lr_schedule="cyclic", lr_cycle=1_000_000)
    assert [lr_at(p, i) for i in (999_999, 1_000_000, 1_200_000, 2_000_000)] == [
        3.125e-5, 5e-4, 2.5e-4, 5e-4]


@pytest.mark.parametrize("sets, match", [
    (["lr_schedule=cosine"], r"lr_schedule: must be one of step, cyclic, got 'cosine'"),
    (["lr_schedule=cyclic"], r"lr_cycle: lr_schedule cyclic needs lr_cycle >= 1"),
    (["lr_schedule=cyclic", "lr_cycle=-5"], r"lr_cycle: lr_schedule cyclic needs lr_cycle"),
    (["lr_cycle=1000"], r"lr_cycle: is only used with lr_schedule: cyclic"),
    (["lr_schedule=cyclic", "lr_cycle=1.5"], r"lr_cycle: expected an integer"),
])
def test_bad_schedule_refused_naming_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["hr_dir=x", *sets])


def test_schedule_keys_are_config_and_digest():
    c = load_config(None, ["hr_dir=x", "lr_schedule=cyclic", "lr_cycle=2e5"])
    assert c.lr_cycle == 200_000 and isinstance(c.lr_cycle, int)
    d = c.to_dict()
    assert d["lr_schedule"] == "cyclic" and d["lr_cycle"] == 200_000
    step = load_config(None, ["hr_dir=x"])
    other = load_config(None, ["hr_dir=x", "lr_schedule=cyclic", "lr_cycle=100"])
    assert len({c.digest(), step.digest(), other.digest()}) == 3
    import rlfn.train.config as config_module
    assert "lr_cycle" in config_module.__doc__ and "cyclic" in config_module.__doc__


# ------------------------------------------------------------------ real runs
TINY = dict(model="rlfn_ntire", scale=4, patch_size=64, batch_size=2, lr=1e-3, log_every=1,
            checkpoint_every=100, val_every=1000, num_workers=0, threads=1, seed=5,
            epoch_iterations=4, amp="off", iterations=7, lr_step=2)


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    for i in range(3):
        Image.fromarray(rgb(72 + 8 * i, 80, seed=i)).save(d / f"img{i}.png")
    return d


def _cfg(hr_dir, **kw):
    return load_config(None, {**TINY, "hr_dir": str(hr_dir), **kw})


def _lrs(out):
    with open(out / "curves.csv", newline="") as fh:
        return {int(r["iteration"]): float(r["lr"]) for r in csv.DictReader(fh)}


def test_cyclic_run_restarts_the_lr_and_keeps_the_optimizer_state(tmp_path, hr_dir):
    cfg = _cfg(hr_dir, lr_schedule="cyclic", lr_cycle=3)
    out = tmp_path / "clr"
    res = train(cfg, out, progress=False)
    assert res.iterations == 7
    # curves: the lr of the step that ended at iteration i is lr_at(i - 1)
    assert _lrs(out) == {1: 1e-3, 2: 1e-3, 3: 5e-4, 4: 1e-3, 5: 1e-3, 6: 5e-4, 7: 1e-3}
    # one Adam across the restarts: its step count is the run's 7 iterations, not the 1
    # since the last restart (a warm start would have begun a fresh optimizer)
    opt = load_file(str(out / "checkpoint" / "optimizer.safetensors"))
    steps = {float(v) for k, v in opt.items() if k.endswith(".step")}
    assert steps == {7.0}
    assert any(k.endswith(".exp_avg_sq") and v.abs().sum() > 0 for k, v in opt.items())
    assert json.loads((out / "result.json").read_text())["config"]["lr_cycle"] == 3


def test_cyclic_resume_is_bit_identical(tmp_path, hr_dir):
    cfg = _cfg(hr_dir, lr_schedule="cyclic", lr_cycle=3, checkpoint_every=2)
    ref = tmp_path / "ref"
    train(cfg, ref, progress=False)
    out = tmp_path / "resumed"
    first = train(cfg, out, progress=False, stop_after=4)  # stops mid-cycle 2 (iterations 3-5)
    assert first.iterations == 4
    second = train(cfg, out, progress=False)
    assert second.resumed_from == 4 and second.iterations == 7
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _lrs(out) == _lrs(ref)


def test_step_and_cyclic_runs_differ_only_after_the_first_restart(tmp_path, hr_dir):
    step = train(_cfg(hr_dir), tmp_path / "step", progress=False)
    clr = train(_cfg(hr_dir, lr_schedule="cyclic", lr_cycle=3), tmp_path / "clr",
                progress=False)
    s, c = _lrs(step.out_dir), _lrs(clr.out_dir)
    assert [s[i] for i in range(1, 8)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4]
    assert all(s[i] == c[i] for i in (1, 2, 3)) and c[4] == 1e-3 != s[4]
