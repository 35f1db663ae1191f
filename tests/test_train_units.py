"""Training pieces on their own: config checks, the schedule, the contrastive loss and the
pickle-free checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rlfn.bicubic import imresize
from rlfn.models import build_model
from rlfn.train.checkpoint import (CheckpointError, TrainState, find_checkpoint,
                                   load_checkpoint, save_checkpoint)
from rlfn.train.config import ConfigError, TrainConfig, load_config
from rlfn.train.schedule import lr_at
from rlfn.train.losses import ContrastiveLoss, FrozenFeatures, bicubic_upsample


# ------------------------------------------------------------------ config
def test_defaults_are_the_papers_recipe():
    c = TrainConfig(hr_dir="x")
    assert (c.lr, c.beta1, c.beta2, c.eps, c.lr_step, c.lr_gamma, c.batch_size, c.patch_size) == (
        5e-4, 0.9, 0.999, 1e-8, 200_000, 0.5, 64, 256)


def test_schedule_halves_every_step():
    c = TrainConfig(hr_dir="x", lr=4e-4, lr_step=10)
    assert [lr_at(c, i) for i in (0, 9, 10, 19, 20, 35)] == [4e-4, 4e-4, 2e-4, 2e-4, 1e-4, 5e-5]


def test_load_config_train_section_stage_and_sets(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  model: rlfn_s\n  scale: 2\n  hr_dir: data/hr\n  lr_step: 2e5\n"
                 "  stages:\n    1: {}\n    2: {lr: 2.0e-4}\n    3: {contrastive: true}\n")
    c1 = load_config(p)
    assert (c1.model, c1.scale, c1.stage, c1.contrastive, c1.lr_step) == ("rlfn_s", 2, 1, False,
                                                                         200000)
    c3 = load_config(p, ["batch_size=8", "contrastive_weight=0.5"], stage=3)
    assert c3.contrastive and c3.contrastive_weight == 0.5 and c3.batch_size == 8
    assert load_config(p, stage=2).lr == 2e-4
    assert c1.digest() != c3.digest()


@pytest.mark.parametrize("sets, match", [
    (["batch_size=0"], "batch_size: must be a positive integer"),
    (["patch_size=250"], "patch_size: 250 is not divisible by the scale 4"),
    (["model=srresnet"], "unknown model name 'srresnet'"),
    (["scale=5"], "scale: must be 2, 3 or 4"),
    (["nope=1"], "unknown key 'nope'"),
    (["lr=-1"], "lr: must be > 0"),
    (["contrastive=maybe"], "expected true/false"),
    (["batch_size"], "expected KEY=VALUE"),
    (["patch_size=32"], "at least 15 px"),
])
def test_bad_params_refused_before_work(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["hr_dir=x", *sets])


def test_missing_data_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="hr_dir"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "b.yaml"
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown stage 4"):
        load_config(None, ["hr_dir=x"], stage=4)


# ------------------------------------------------------------------ contrastive loss
def test_feature_extractor_is_seeded_and_frozen():
    a, b, c = FrozenFeatures(16, seed=3), FrozenFeatures(16, seed=3), FrozenFeatures(16, seed=4)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training
    assert [type(m).__name__ for m in a.children()] == ["Conv2d", "Conv2d"]


def test_contrastive_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 32, 32, generator=g) * 255
    lr = imresize(hr, scale=0.25)
    neg = bicubic_upsample(lr, 4)
    assert neg.shape == hr.shape
    loss_fn = ContrastiveLoss(16, seed=1)
    sr = (hr + torch.randn(hr.shape, generator=g) * 20).requires_grad_(True)
    loss = loss_fn(sr, hr, neg)
    f = loss_fn.features
    want = F.l1_loss(f(sr), f(hr)) / F.l1_loss(f(sr), f(neg))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())
    # the loss prefers the HR over the blurry negative
    assert loss_fn(hr.clone(), hr, neg).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(neg + 0.01, hr, neg).item() > 10


# ------------------------------------------------------------------ checkpoints
def _step(model, opt):
    x = torch.rand(2, 3, 16, 16) * 255
    loss = model(x).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    torch.manual_seed(0)
    m = build_model("rlfn_s", 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    _step(m, opt)
    save_checkpoint(tmp_path, m, opt, TrainState(7, 2, "abc", best_psnr=30.5, best_iteration=5))
    ck = find_checkpoint(tmp_path)
    assert ck == tmp_path / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                    "rng.safetensors", "state.json"]
    torch.manual_seed(1)
    m2 = build_model("rlfn_s", 2)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    st = load_checkpoint(ck, m2, opt2)
    assert (st.iteration, st.stage, st.config_digest, st.best_psnr) == (7, 2, "abc", 30.5)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    # one more identical step on both: still identical (optimizer moments restored exactly)
    torch.manual_seed(5)
    _step(m, opt)
    torch.manual_seed(5)
    _step(m2, opt2)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_refuses_other_arch_and_corruption(tmp_path):
    m = build_model("rlfn_s", 2)
    opt = torch.optim.Adam(m.parameters())
    save_checkpoint(tmp_path, m, opt, TrainState(1, 1, "d"))
    ck = tmp_path / "checkpoint"
    other = build_model("rlfn", 2)
    with pytest.raises(CheckpointError, match=r"model.safetensors: checkpoint of another "
                                              r"architecture.*feature_channels 48 \(this run: 52\)"):
        load_checkpoint(ck, other, torch.optim.Adam(other.parameters()))
    x4 = build_model("rlfn_s", 4)
    with pytest.raises(CheckpointError, match=r"scale 2 \(this run: 4\)"):
        load_checkpoint(ck, x4, torch.optim.Adam(x4.parameters()))
    data = bytearray((ck / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ck / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: corrupted"):
        load_checkpoint(ck, m, opt)
    (ck / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json: unreadable"):
        load_checkpoint(ck, m, opt)


def test_interrupted_swap_falls_back_to_old(tmp_path):
    m = build_model("rlfn_s", 2)
    opt = torch.optim.Adam(m.parameters())
    save_checkpoint(tmp_path, m, opt, TrainState(3, 1, "d"))
    # simulate a crash between "checkpoint -> checkpoint.old" and "tmp -> checkpoint"
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    ck = find_checkpoint(tmp_path)
    assert ck == tmp_path / "checkpoint.old"
    assert json.loads((ck / "state.json").read_text())["iteration"] == 3


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    """A checkpoint of one architecture in the output folder, a run of another: a clean
    CheckpointError naming both, not a crash."""
    other = build_model("rfdb_r48", 4)
    opt = torch.optim.Adam(other.parameters())
    ck = save_checkpoint(tmp_path, other, opt, TrainState(1, 1, "d"))
    model = build_model("rlfn_ntire", 4)
    with pytest.raises(CheckpointError, match="another architecture: RFDNConfig"):
        load_checkpoint(ck, model, torch.optim.Adam(model.parameters()))
