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
from rlfn.errors import DataError, EXIT_DATA, EXIT_USAGE
from rlfn.errors import ConfigError as SharedConfigError
from rlfn.train.config import (ConfigError, TrainConfig, load_config, params_stage_config,
                               stage_config)
from rlfn.yamlnum import yaml_number
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


def test_load_config_params_file_is_train_plus_train_stages(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  model: rlfn_s\n  scale: 2\n  hr_dir: data/hr\n  lr_step: 2e5\n"
                 "train_stages:\n  '1': {init: data/patches}\n"
                 "  '2': {init: models/stage1/model.safetensors, lr: 2.0e-4}\n"
                 "  '3': {init: models/stage2/model.safetensors, contrastive: true}\n")
    c1 = load_config(p, stage=1)
    assert (c1.model, c1.scale, c1.stage, c1.contrastive, c1.lr_step) == ("rlfn_s", 2, 1, False,
                                                                         200000)
    c3 = load_config(p, ["batch_size=8", "contrastive_weight=0.5"], stage=3)
    assert c3.contrastive and c3.contrastive_weight == 0.5 and c3.batch_size == 8
    assert load_config(p, stage=2).lr == 2e-4 and load_config(p, ["stage=2"]).lr == 2e-4
    assert c1.digest() != c3.digest()
    # several stages: which one is never guessed; a stage it does not define is refused
    with pytest.raises(ConfigError, match=r"^--stage: .*params.yaml defines stages 1, 2, 3 "
                                          r"\(train_stages\); say which one"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^--stage: no stage 4 in .*params.yaml: "
                                          r"train_stages; defined: 1, 2, 3"):
        load_config(p, stage=4)
    # a stage that train_stages does not make contrastive is not (no built-in stage 3)
    q = tmp_path / "two.yaml"
    q.write_text("train: {hr_dir: x}\ntrain_stages: {'3': {init: data/patches}}\n")
    c = load_config(q)
    assert (c.stage, c.contrastive) == (3, False)


def test_old_layouts_are_refused_naming_the_key(tmp_path):
    old = tmp_path / "params.yaml"
    old.write_text("train: {hr_dir: x}\ntrain_stages: {'1': {}}\ntrain_stage2: {lr: 2.0e-4}\n")
    with pytest.raises(ConfigError) as e:
        load_config(old, stage=2)
    assert e.value.where == f"{old}: train_stage2" and "train_stage<k> layout is gone" in str(
        e.value)
    # a file with a train: section and no train_stages is that one stage's config (the
    # ablation models' `rlfn train --config train.yaml` files): the section, nothing else
    none = tmp_path / "none.yaml"
    none.write_text("train: {hr_dir: x, lr: 3.0e-4}\n")
    c = load_config(none)
    assert (c.stage, c.lr, c.hr_dir) == (1, 3e-4, "x")
    assert load_config(none, stage=2).stage == 2
    nested = tmp_path / "nested.yaml"
    nested.write_text("train: {hr_dir: x, stages: {1: {}}}\ntrain_stages: {'1': {}}\n")
    with pytest.raises(ConfigError, match=r"nested.yaml: train.stages: unknown key 'stages'; "
                                          r"a config holds one stage's values"):
        load_config(nested, stage=1)


def test_stage_config_file_is_one_stage(tmp_path):
    t = tmp_path / "config.yaml"
    t.write_text("hr_dir: x\nlr: 1.0e-3\nstage: 5\ncontrastive: true\n")
    c5 = load_config(t)
    assert (c5.stage, c5.lr, c5.contrastive) == (5, 1e-3, True)
    assert load_config(t, stage=5) == c5
    with pytest.raises(ConfigError, match=r"^--stage: 3, but .*config.yaml: stage says this "
                                          r"is stage 5's config"):
        load_config(t, stage=3)
    # without a stage key, --stage names it and changes no value (no built-in stage 3)
    u = tmp_path / "plain.yaml"
    u.write_text("hr_dir: x\n")
    c = load_config(u, stage=3)
    assert (c.stage, c.contrastive) == (3, False)
    assert {k: v for k, v in c.to_dict().items() if k != "stage"} == {
        k: v for k, v in load_config(u).to_dict().items() if k != "stage"}
    s = tmp_path / "stages.yaml"
    s.write_text("hr_dir: x\nstages: {5: {lr: 5.0e-4}}\n")
    with pytest.raises(ConfigError, match=r"stages.yaml: stages: unknown key 'stages'"):
        load_config(s)


def test_the_stage_check_is_not_limited_to_three():
    assert TrainConfig(hr_dir="x", stage=4).validate().stage == 4
    with pytest.raises(ConfigError, match=r"stage: must be a positive integer, got 0"):
        TrainConfig(hr_dir="x", stage=0).validate()
    c = stage_config({"hr_dir": "x", "lr": 1e-3}, {"contrastive": True}, 9,
                     extra={"patch_store": "p.arrow"}, where="params.yaml",
                     stage_where="train_stages.9")
    assert (c.stage, c.contrastive, c.patch_store, c.lr) == (9, True, "p.arrow", 1e-3)
    # the params layout's merge: init is the pipeline's, not a training key
    d = params_stage_config({"hr_dir": "x"}, {"9": {"init": "a.safetensors", "lr": 2e-3}}, 9)
    assert (d.stage, d.lr) == (9, 2e-3)


def test_yaml_numbers_one_rule():
    assert yaml_number("2e5", "k", integer=True) == 200000 and yaml_number(3, "k") == 3.0
    for bad, msg in (("abc", "expected a number, got 'abc'"), (True, "expected a number"),
                     (2.5, "expected an integer, got 2.5"), (float("inf"), "expected a number")):
        with pytest.raises(ConfigError, match=msg):
            yaml_number(bad, "k", integer=True)
    assert load_config(None, ["hr_dir=x", "lr_step=2e5", "lr=1e-3"]).lr_step == 200000


S = "train_stages: {'1': {}, '2': {}}\n"


@pytest.mark.parametrize("text, sets, where, reason", [
    ("train: {hr_dir: x, lr: -1}\n" + S, [], "{p}: train.lr", "must be > 0, got -1.0"),
    ("train: {hr_dir: x}\ntrain_stages: {'2': {batch_size: 0}}\n", [],
     "{p}: train_stages.2.batch_size", "must be a positive integer, got 0"),
    ("train: {hr_dir: x, amp: fp8}\n" + S, [], "{p}: train.amp",
     "must be auto, bf16 or off, got 'fp8'"),
    ("train: {hr_dir: x, seed: abc}\n" + S, [], "{p}: train.seed",
     "expected a number, got 'abc'"),
    ("train: {hr_dir: x}\n" + S, ["lr_gamma=2"], "--set lr_gamma", "must be in (0, 1], got 2.0"),
    ("train: {hr_dir: x, betch_size: 3}\n" + S, [], "{p}: train.betch_size",
     "unknown key 'betch_size'; did you mean 'batch_size'?"),
    ("train: {model: rlfn}\n" + S, [], "{p}: train.hr_dir",
     "give hr_dir (a folder of HR images) or patch_store"),
    ("train: [1, 2]\n", [], "{p}: train", "expected a mapping of keys, got list"),
    ("other: {}\n", [], "{p}: other", "unknown key 'other'"),
])
def test_config_errors_name_the_file_the_key_and_the_value(tmp_path, text, sets, where, reason):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, sets, stage=2 if "train_stages" in text else None)
    assert (e.value.where, e.value.reason) == (where.format(p=p), reason)
    assert str(e.value) == f"{where.format(p=p)}: {reason}"


def test_errors_are_the_shared_contract(tmp_path):
    assert ConfigError is SharedConfigError
    with pytest.raises(SharedConfigError) as e:
        load_config(None, ["hr_dir=x", "lr=0"])
    assert e.value.exit_code == EXIT_USAGE and isinstance(e.value, ValueError)
    err = CheckpointError(tmp_path / "c", "corrupted")
    assert isinstance(err, DataError) and isinstance(err, ValueError)
    assert (err.where, err.path, err.reason, err.exit_code) == (
        str(tmp_path / "c"), str(tmp_path / "c"), "corrupted", EXIT_DATA)
    assert str(err) == f"{tmp_path / 'c'}: corrupted"


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
    with pytest.raises(ConfigError, match="stage: must be a positive integer"):
        load_config(None, ["hr_dir=x"], stage=0)


def test_bf16_autocast_choice(monkeypatch):
    from rlfn.device import cpu_amx_usable, cpu_has_bf16
    from rlfn.machine import cpu_vendor
    from rlfn.train.step import use_bf16

    cpu = torch.device("cpu")
    auto = TrainConfig(hr_dir="x", amp="auto")
    assert not use_bf16(TrainConfig(hr_dir="x", amp="off"), cpu)
    assert use_bf16(TrainConfig(hr_dir="x", amp="bf16"), cpu)
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(k, raising=False)
    amx = bool(torch.cpu._is_amx_tile_supported())
    amd = cpu_vendor() == "AuthenticAMD"
    assert cpu_amx_usable() == amx
    # this machine: bf16 with AMX, or on an AMD CPU with AVX512-BF16 (measured faster there)
    assert use_bf16(auto, cpu) == (cpu_has_bf16() and (amx or amd))
    # oneDNN capped below AMX (what bench/main_job.py --isa AVX512_CORE_BF16 sets): AMX off;
    # bf16 stays only on AMD; below bf16 (AVX2) fp32 everywhere
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not cpu_amx_usable() and use_bf16(auto, cpu) == (cpu_has_bf16() and amd)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not cpu_amx_usable() and not use_bf16(auto, cpu)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")  # oneDNN's older name, below bf16
    assert not use_bf16(auto, cpu)
    for cap in ("AVX512_CORE_AMX", "ALL"):  # AMX allowed: as without a cap
        monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)
        assert cpu_amx_usable() == amx and use_bf16(auto, cpu) == (cpu_has_bf16() and (amx or amd))


@pytest.mark.parametrize("vendor,amx,cap,want", [
    ("GenuineIntel", True, "", True),                    # Xeon with AMX: 1.79x
    ("GenuineIntel", True, "AVX512_CORE_BF16", False),   # the same capped: 0.63x
    ("GenuineIntel", False, "", False),                  # AVX512-BF16, no AMX: as capped
    ("AuthenticAMD", False, "", True),                   # EPYC, AVX512-BF16: 1.62x
    ("AuthenticAMD", False, "AVX512_CORE_BF16", True),
    ("AuthenticAMD", False, "AVX512_CORE_VNNI", False),  # capped below bf16
    ("AuthenticAMD", False, "AVX2", False),
    ("", False, "", False),                              # a vendor not measured: fp32
])
def test_bf16_autocast_follows_what_was_measured_per_cpu_class(monkeypatch, vendor, amx, cap,
                                                               want):
    """The rule on every CPU class measured (rlfn.device.BF16_FASTER_WITHOUT_AMX), whatever
    this machine is: vendor, AMX and the cap given, bf16 runs natively."""
    from rlfn import device
    from rlfn.train.step import use_bf16

    monkeypatch.setattr(device, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert use_bf16(TrainConfig(hr_dir="x", amp="auto"), torch.device("cpu")) is want
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)  # emulated bf16: never
    assert use_bf16(TrainConfig(hr_dir="x", amp="auto"), torch.device("cpu")) is False


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
