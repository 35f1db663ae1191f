"""The promotion gate does not depend on how fast the machine is: the runtime it gates is the
candidate's time relative to a reference model timed image by image in the same run
(``runtime_rel``), while the absolute milliseconds (recorded, not gated) follow the machine.

The machines here are made deterministic rather than measured: every forward advances a clock
of the test's own by the model's multiply-accumulates on that input divided by the machine's
speed (``OpClock``), through the real timing path (``rlfn.profile.profile_runtime``, the same
image-by-image alternation as the profile stage) and the real decision (``_decide``). Whether
real machines keep the ratio (2 threads vs 1, a busy core) is a speed claim, so it lives in
``bench/gate.py``, never in a test."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from torch import nn

from pipeline.mlflow_registry.promotion import _decide
from pipeline.mlflow_registry.versions import figure_tags
from pipeline.settings import PromoteSettings
from rlfn.complexity import count_complexity
from rlfn.backends import make_engine
from rlfn.io import write_png
from rlfn.models import build_model
from rlfn.profile import profile_runtime


class OpClock:
    """A clock (seconds) that only moves when a model runs: by its MACs / ``macs_per_s``."""

    def __init__(self, macs_per_s: float):
        self.macs_per_s, self.now = macs_per_s, 0.0

    def __call__(self) -> float:
        return self.now


class Costed(nn.Module):
    """``model``, whose every forward advances ``clock`` by its MACs on that input (plus
    ``stall_macs``: a fixed cost per call, what a busy core adds to every op)."""

    def __init__(self, model: nn.Module, clock: OpClock, stall_macs: float = 0.0):
        super().__init__()
        self.model, self.clock, self.stall, self._macs = model, clock, stall_macs, {}
        self.scale = model.scale

    def forward(self, x):
        out = self.model(x)
        hw = tuple(x.shape[-2:])
        if hw not in self._macs:
            self._macs[hw] = count_complexity(self.model, hw)["flops"]
        self.clock.now += (x.shape[0] * self._macs[hw] + self.stall) / self.clock.macs_per_s
        return out


def _version(figures: dict) -> ModelVersion:
    tags = [ModelVersionTag(k, v) for k, v in figure_tags(figures).items()]
    return ModelVersion("rlfn-x4", "1", 0, tags=tags)


MODELS = ("rlfn_ntire", "rlfn", "edsr_baseline")


def _measure(images, macs_per_s: float, stall_macs: float = 0.0) -> dict:
    clock = OpClock(macs_per_s)
    torch.manual_seed(0)
    ref = make_engine(Costed(build_model("rlfn_ntire", 4).eval(), clock, stall_macs), "eager",
                      "cpu")
    out = {}
    for name in MODELS:
        torch.manual_seed(1)
        model = make_engine(Costed(build_model(name, 4).eval(), clock, stall_macs), "eager",
                            "cpu")
        r = profile_runtime(model, images, 0, 1, reference=ref, clock=clock)
        out[name] = {"runtime_rel": r["relative"], "runtime_ms_cpu": r["median_ms"]}
    return out


def _decisions(runs: dict, budget: float) -> dict:
    budgets = PromoteSettings(runtime_budget_rel=budget).budgets()
    assert budgets == {"runtime_rel": budget}
    out = {}
    for name, f in runs.items():
        ok, reason = _decide(_version({"mean_psnr_y": 30.0, **f}), None, "mean_psnr_y", 0.0,
                             budgets, True)
        assert ok or "over the runtime budget: runtime_rel" in reason, reason
        out[name] = ok
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("lr")
    rng = np.random.default_rng(0)
    for i, hw in enumerate([(24, 30), (30, 24), (36, 36)]):  # sizes differ: the median counts
        write_png(d / f"{i}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    return d


def test_a_slower_machine_gets_the_same_decision(images):
    fast, slow = _measure(images, 4e9), _measure(images, 1e9)  # a machine 4x slower
    for name in MODELS:
        # the absolute time follows the machine, the relative one does not
        assert slow[name]["runtime_ms_cpu"] == pytest.approx(4 * fast[name]["runtime_ms_cpu"])
        assert slow[name]["runtime_rel"] == pytest.approx(fast[name]["runtime_rel"])
    assert fast["rlfn_ntire"]["runtime_rel"] == pytest.approx(1.0)  # its own reference
    # RLFN does 1.6-1.8x the challenge model's work, EDSR-baseline several times more
    # clock-ok: OpClock's times are counted MACs, the same on every machine
    assert 1.5 < fast["rlfn"]["runtime_rel"] < 2.0 < 4 < fast["edsr_baseline"]["runtime_rel"]
    for runs in (fast, slow):
        assert _decisions(runs, 2.5) == {"rlfn_ntire": True, "rlfn": True,
                                         "edsr_baseline": False}


def test_a_candidate_at_the_budget_is_decided_by_its_ratio_alone(images):
    fast, slow = _measure(images, 4e9), _measure(images, 1e9)
    rel = fast["rlfn"]["runtime_rel"]
    for runs in (fast, slow):  # a hair under and over RLFN's ratio: the same on both machines
        assert _decisions(runs, rel * 1.001)["rlfn"] is True
        assert _decisions(runs, rel * 0.999)["rlfn"] is False


def test_a_stalled_machine_moves_the_ratio_but_not_a_clear_decision(images):
    """A busy core adds a cost to every forward whatever its size (``stall_macs``): the small
    reference suffers most, so every ratio falls. Candidates far from the budget keep their
    decision; the one near it is where a busy profile can mislead (the README's known limit:
    let the profile stage run alone)."""
    idle = _measure(images, 1e9)
    stall = count_complexity(build_model("rlfn_ntire", 4), (30, 30))["flops"]  # 1 forward more
    busy = _measure(images, 1e9, stall_macs=stall)
    for name in ("rlfn", "edsr_baseline"):  # clock-ok: OpClock (counted MACs)
        assert busy[name]["runtime_rel"] < idle[name]["runtime_rel"]
    assert _decisions(busy, 2.5) == _decisions(idle, 2.5)


def test_absolute_budget_is_off_by_default_and_budgets_name_their_figures():
    p = PromoteSettings()
    assert p.runtime_budget_ms is None and "runtime_ms_cpu" not in p.budgets()
    p = PromoteSettings(runtime_budget_rel=None, flops_budget_g=40, runtime_budget_ms=3000)
    assert p.budgets() == {"flops": 40e9, "runtime_ms_cpu": 3000}
    ok, reason = _decide(_version({"mean_psnr_y": 30.0, "flops": 41e9, "runtime_ms_cpu": 1.0}),
                         None, "mean_psnr_y", 0.0, p.budgets(), True)
    assert not ok and "over the FLOPs budget: flops 4.1e+10 > 4e+10" in reason, reason
    ok, reason = _decide(_version({"mean_psnr_y": 30.0}), None, "mean_psnr_y", 0.0,
                         {"runtime_rel": 3.0}, True)
    assert not ok and "no runtime_rel figure" in reason


def test_a_busy_core_through_the_stages_thread_policy(images):
    """The profile stage's own thread policy (``pipeline.entry.run_entry``:
    ``configure_threads(0, load_aware=True)``) with a real process spinning on one core: it
    leaves that core to the spinner. The stage then times on the cores left to it, each op
    stalled by the busy core (``stall_macs``, as above; on this clock ops scale perfectly with
    threads, so the count itself drops out of the ratio): every ``runtime_rel`` stays in the
    band (0, 1] x its idle figure (the stall costs the small reference most: 0.77x for RLFN,
    0.53x for EDSR-baseline), the clear decisions stay, and a candidate just under the budget
    (idle ratio x1.001) is still accepted. On real cores the thread count does
    move the ratio (RLFN 2.04 at 2 threads, 2.32 at 1, 2.34 at 1 beside a spinner on the 2-core
    Xeon): that is a speed claim, ``bench/gate.py``'s."""
    from rlfn.threads import available_cores, choose_threads

    cores = available_cores()
    if cores < 2:
        pytest.skip(f"{cores} core: no core to leave to another process")
    env: dict = {}  # no explicit count, no siblings: the policy alone
    idle_choice = choose_threads(0, environ=env, busy=0.0)
    spinner = subprocess.Popen([sys.executable, "-c", "import sys\nprint('spin', flush=True)\n"
                                "while True: pass"], stdout=subprocess.PIPE, text=True)
    try:
        assert spinner.stdout.readline() == "spin\n"
        busy_choice = choose_threads(0, environ=env)  # measured from /proc/stat, as the stage
    finally:
        spinner.kill()
        spinner.wait()
    assert idle_choice.threads == cores, idle_choice
    assert busy_choice.threads <= cores - 1 and "busy with other processes" in \
        busy_choice.reason, busy_choice
    per_thread = 1e9
    idle = _measure(images, per_thread * idle_choice.threads)
    stall = count_complexity(build_model("rlfn_ntire", 4), (30, 30))["flops"]
    busy = _measure(images, per_thread * busy_choice.threads, stall_macs=stall)
    for name in ("rlfn", "edsr_baseline"):
        band = busy[name]["runtime_rel"] / idle[name]["runtime_rel"]
        assert 0.0 < band <= 1.0, (name, band)  # clock-ok: OpClock (counted MACs)
    assert _decisions(busy, 2.5) == _decisions(idle, 2.5)
    near = idle["rlfn"]["runtime_rel"] * 1.001
    assert _decisions(idle, near)["rlfn"] is True and _decisions(busy, near)["rlfn"] is True
