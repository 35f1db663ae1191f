"""The RLFN paper's ablation models (RFDB, RFDB-R48/R52 inside RFDN; EDSR-baseline): parameter
counts against hand-derived and published figures, wiring against a functional reading of the
reference code, shapes, weights round trips for every registered model, and a short
``rlfn train`` of an ablation model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from imagefiles import rgb
from rlfn.cli import main
from rlfn.models import (EDSR, RFDN, EDSRConfig, RFDNConfig, build_model, config_for,
                         model_names, name_for)
from rlfn.models.edsr import DIV2K_RGB_MEAN
from rlfn.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from rlfn.weights import WeightsError, infer_config, load_model, read_metadata, save_model

NEW = ["rfdb", "rfdb_r48", "rfdb_r52", "edsr_baseline"]


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------ parameter counts by hand
def conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def esa_rfdn(c: int, f: int) -> int:
    # conv1 1x1, conv_f 1x1, conv2/conv_max/conv3/conv3_ 3x3, conv4 1x1 (njulj/RFDN block.py)
    return conv(c, f, 1) + conv(f, f, 1) + 4 * conv(f, f, 3) + conv(f, c, 1)


def rfdb(c: int) -> int:
    dc = c // 2
    return (3 * conv(c, dc, 1) + 3 * conv(c, c, 3) + conv(c, dc, 3) + conv(4 * dc, c, 1)
            + esa_rfdn(c, c // 4))


def rfdb_r(c: int) -> int:
    return 3 * conv(c, c, 3) + conv(c, c, 1) + esa_rfdn(c, c // 4)


def rfdn(c: int, blocks: int, scale: int, block=rfdb) -> int:
    return (conv(3, c, 3) + blocks * block(c) + conv(blocks * c, c, 1) + conv(c, c, 3)
            + conv(c, 3 * scale * scale, 3))


def edsr(c: int, blocks: int, scale: int) -> int:
    up = conv(c, 9 * c, 3) if scale == 3 else {2: 1, 4: 2}[scale] * conv(c, 4 * c, 3)
    return conv(3, c, 3) + blocks * 2 * conv(c, c, 3) + conv(c, c, 3) + up + conv(c, 3, 3)


HAND = {
    "rfdb": lambda s: rfdn(48, 4, s),
    "rfdb_r48": lambda s: rfdn(48, 4, s, rfdb_r),
    "rfdb_r52": lambda s: rfdn(52, 4, s, rfdb_r),
    "edsr_baseline": lambda s: edsr(64, 16, s),
}


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_param_counts_match_the_hand_derivation(name, scale):
    assert n_params(build_model(name, scale)) == HAND[name](scale)


def test_param_counts_x4_literal():
    # the figures the report quotes (so a change to the formulas above cannot hide one)
    got = {name: n_params(build_model(name, 4)) for name in NEW}
    assert got == {"rfdb": 402_288, "rfdb_r48": 337_392, "rfdb_r52": 393_844,
                   "edsr_baseline": 1_517_571}


def test_published_param_counts():
    # EDSR-PyTorch README (sanghyun-son/EDSR-PyTorch): EDSR_baseline x2 1.37 M, x3 1.55 M,
    # x4 1.52 M parameters
    for scale, published in ((2, 1.37), (3, 1.55), (4, 1.52)):
        assert round(n_params(build_model("edsr_baseline", scale)) / 1e6, 2) == published
    # njulj/RFDN as released (RFDN.py: nf=50, 4 RFDBs, x4): 433,448 by hand
    rfdn50 = build_model("rfdb", 4, feature_channels=50)
    assert n_params(rfdn50) == rfdn(50, 4, 4) == 433_448
    # RFDN-L (52 channels, 6 RFDBs), x4: 681K in published comparison tables (e.g. SpikeSR's
    # Table 1, which lists RLFN at 544K and EDSR at 1518K the same way)
    assert round(n_params(build_model("rfdb", 4, feature_channels=52, num_blocks=6)) / 1e3) == 681
    assert round(n_params(build_model("rlfn", 4)) / 1e3) == 544
    assert round(n_params(build_model("edsr_baseline", 4)) / 1e3) == 1518


# ------------------------------------------------------------------ structure and wiring
def test_block_structure_follows_the_ablation():
    full = build_model("rfdb", 4)
    bare = build_model("rfdb_r48", 4)
    k_full = {k.split(".", 1)[1] for k in full.state_dict() if k.startswith("block_1.")}
    k_bare = {k.split(".", 1)[1] for k in bare.state_dict() if k.startswith("block_1.")}
    distillation = {f"{m}.{p}" for m in ("c1_d", "c2_d", "c3_d", "c4") for p in ("weight", "bias")}
    assert k_full - k_bare == distillation and k_bare < k_full
    # RFDN's ESA: the two extra 3x3 convs of the pooled branch that RLFN's ESA dropped
    assert {"esa.conv_max.weight", "esa.conv3b.weight"} <= k_bare
    rlfn_keys = {k.split(".", 1)[1] for k in build_model("rlfn", 4).state_dict()
                 if k.startswith("block_1.")}
    assert not any("conv_max" in k or "conv3b" in k for k in rlfn_keys)
    # the distilled width is half the features; ESA uses a quarter (njulj: dc = C//2, f = C//4)
    assert full.block_1.c1_d.out_channels == 24 and full.block_1.esa.conv1.out_channels == 12
    assert build_model("rfdb_r52", 4).block_1.esa.conv1.out_channels == 13
    # network level: a 1x1 fusion of the concatenation of all 4 block outputs
    assert full.conv_fuse.in_channels == 4 * 48 and len(full.blocks) == 4


def _esa_reference(esa, x):
    c1_ = F.conv2d(x, esa.conv1.weight, esa.conv1.bias)
    c1 = F.conv2d(c1_, esa.conv2.weight, esa.conv2.bias, stride=2)
    v = F.max_pool2d(c1, 7, 3)
    v = F.relu(F.conv2d(v, esa.conv_max.weight, esa.conv_max.bias, padding=1))
    c3 = F.relu(F.conv2d(v, esa.conv3.weight, esa.conv3.bias, padding=1))
    c3 = F.conv2d(c3, esa.conv3b.weight, esa.conv3b.bias, padding=1)
    c3 = F.interpolate(c3, x.shape[2:], mode="bilinear", align_corners=False)
    cf = F.conv2d(c1_, esa.conv_f.weight, esa.conv_f.bias)
    return x * torch.sigmoid(F.conv2d(c3 + cf, esa.conv4.weight, esa.conv4.bias))


def _c(mod, x):
    return F.conv2d(x, mod.weight, mod.bias, padding=mod.kernel_size[0] // 2)


def _rfdb_reference(b, x):
    lrelu = lambda t: F.leaky_relu(t, 0.05)  # noqa: E731
    d1 = lrelu(_c(b.c1_d, x))
    r1 = lrelu(_c(b.c1_r, x) + x)
    d2 = lrelu(_c(b.c2_d, r1))
    r2 = lrelu(_c(b.c2_r, r1) + r1)
    d3 = lrelu(_c(b.c3_d, r2))
    r3 = lrelu(_c(b.c3_r, r2) + r2)
    r4 = lrelu(_c(b.c4, r3))
    return _esa_reference(b.esa, _c(b.c5, torch.cat([d1, d2, d3, r4], 1)))


def _rfdbr_reference(b, x):
    lrelu = lambda t: F.leaky_relu(t, 0.05)  # noqa: E731
    out = lrelu(_c(b.c3_r, lrelu(_c(b.c2_r, lrelu(_c(b.c1_r, x))))))
    return _esa_reference(b.esa, _c(b.c5, out + x))


@pytest.mark.parametrize("name", ["rfdb", "rfdb_r48"])
def test_forward_equals_the_reference_computation(name):
    torch.manual_seed(0)
    m = build_model(name, 3).eval()
    block_ref = _rfdb_reference if name == "rfdb" else _rfdbr_reference
    x = torch.rand(1, 3, 23, 19) * 255
    with torch.no_grad():
        feat = _c(m.conv_1, x)
        outs, out = [], feat
        for b in m.blocks:
            out = block_ref(b, out)
            outs.append(out)
        fused = F.leaky_relu(_c(m.conv_fuse, torch.cat(outs, 1)), 0.05)
        want = F.pixel_shuffle(_c(m.upsampler[0], _c(m.conv_2, fused) + feat), 3)
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_edsr_reference_layout_and_mean_shift():
    m = build_model("edsr_baseline", 4)
    keys = set(m.state_dict())
    # EDSR-PyTorch's names, so its released baseline state_dicts load unchanged
    for k in ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias",
              "head.0.weight", "body.0.body.0.weight", "body.0.body.2.weight",
              "body.15.body.2.bias", "body.16.weight", "tail.0.0.weight", "tail.0.2.weight",
              "tail.1.weight"):
        assert k in keys, k
    assert "body.17.weight" not in keys and "tail.0.4.weight" not in keys
    assert set(build_model("edsr_baseline", 3).state_dict()) - keys == set()  # one x3 step
    assert build_model("edsr_baseline", 3).tail[0][0].out_channels == 9 * 64
    mean = torch.tensor(DIV2K_RGB_MEAN) * 255
    torch.testing.assert_close(m.sub_mean.bias, -mean)
    # all learned weights zero: the output is the DIV2K mean colour, in 0..255
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        y = m(torch.rand(1, 3, 5, 6) * 255)
    torch.testing.assert_close(y, mean.view(1, 3, 1, 1).expand(1, 3, 20, 24))
    # res_scale multiplies the residual branch only
    torch.manual_seed(0)
    a = EDSR(EDSRConfig(scale=2, num_blocks=1, feature_channels=8))
    b = EDSR(EDSRConfig(scale=2, num_blocks=1, feature_channels=8, res_scale=0.0))
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 6, 6) * 255
    with torch.no_grad():
        h = a.head(a.sub_mean(x))
        want = a.add_mean(a.tail(a.body[1](h) + h))  # the zeroed block is an identity
        torch.testing.assert_close(b(x), want)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shapes_and_pixel_range_convention(name, scale):
    m = build_model(name, scale).eval()
    assert m.scale == scale
    with torch.no_grad():
        y = m(torch.rand(2, 3, 17, 21) * 255)
    assert y.shape == (2, 3, 17 * scale, 21 * scale)


@pytest.mark.parametrize("name", ["rfdb", "rfdb_r48"])
def test_min_input_size_is_the_true_minimum(name):
    m = build_model(name, 2).eval()
    assert m.min_input_size == 15
    with torch.no_grad():
        assert m(torch.rand(1, 3, 15, 15)).shape == (1, 3, 30, 30)
        with pytest.raises(RuntimeError):
            m(torch.rand(1, 3, 14, 40))


def test_edsr_takes_any_size():
    m = build_model("edsr_baseline", 2).eval()
    assert m.min_input_size == 1
    with torch.no_grad():
        assert m(torch.rand(1, 3, 1, 1)).shape == (1, 3, 2, 2)


# ------------------------------------------------------------------ registry and weights
def test_registry_lists_and_builds_all():
    assert set(NEW) <= set(model_names())
    assert {"rlfn", "rlfn_s", "rlfn_ntire"} <= set(model_names())
    assert isinstance(build_model("RFDB-R52", 2), RFDN)  # spelling as in the paper
    with pytest.raises(ValueError, match="unknown model name 'rfdb_r50'"):
        build_model("rfdb_r50")
    assert name_for(RFDNConfig(scale=3, feature_channels=50)) == "rfdn_custom"
    assert name_for(config_for("rfdb_r52", 2)) == "rfdb_r52"


@pytest.mark.parametrize("name", sorted(model_names()))
def test_save_load_round_trip_every_model(tmp_path, name):
    scale = 3 if name.startswith("edsr") else 2
    torch.manual_seed(1)
    m = build_model(name, scale).eval()
    out = save_model(m, tmp_path / f"{name}.safetensors", provenance={"k": 1})
    meta = read_metadata(out)
    assert (meta["model"], meta["scale"], meta["arch"]) == (name, str(scale),
                                                            type(m).__name__)
    back = load_model(out)
    assert type(back.model) is type(m) and back.name == name and back.config == m.config
    x = torch.rand(1, 3, 16, 18) * 255
    with torch.no_grad():
        assert torch.equal(back.model(x), m(x))
    # the same tensors without our metadata (a .pth, or a checkpoint read without it):
    # recognised from the tensors' names and shapes
    assert infer_config(m.state_dict()) == m.config
    pth = tmp_path / f"{name}.pth"
    torch.save(m.state_dict(), pth)
    assert load_model(pth).name == name


def test_custom_config_round_trips_through_metadata(tmp_path):
    m = RFDN(RFDNConfig(scale=4, feature_channels=20, num_blocks=2, esa_channels=7))
    back = load_model(save_model(m, tmp_path / "c.safetensors"))
    assert back.name == "rfdn_custom" and back.config == m.config
    e = EDSR(EDSRConfig(scale=2, feature_channels=16, num_blocks=3, res_scale=0.1))
    back = load_model(save_model(e, tmp_path / "e.safetensors"))
    assert back.config.res_scale == 0.1  # not in any tensor shape: from the metadata


def test_mismatched_weights_name_the_file_and_reason(tmp_path):
    sd = build_model("rfdb_r48", 4).state_dict()
    sd["block_2.c1_r.weight"] = torch.zeros(10, 48, 3, 3)
    p = tmp_path / "odd.pth"
    torch.save(sd, p)
    with pytest.raises(WeightsError, match=r"odd\.pth: not an RFDN state dict: wrong shape "
                                           r"block_2\.c1_r\.weight"):
        load_model(p)
    # metadata naming one architecture over the tensors of another
    f = save_model(build_model("edsr_baseline", 2), tmp_path / "e.safetensors")
    from safetensors.torch import load_file, save_file
    meta = read_metadata(f)
    raw = {k: str(v) if not isinstance(v, (dict, list)) else json.dumps(v)
           for k, v in meta.items()}
    lie = tmp_path / "lie.safetensors"
    save_file(load_file(str(f)), str(lie),
              metadata={**raw, "arch": "RFDN", "config": json.dumps(config_for("rfdb", 2)
                                                                    .to_dict())})
    with pytest.raises(WeightsError, match=r"lie\.safetensors: not an RFDN state dict: missing"):
        load_model(lie)
    save_file(load_file(str(f)), str(lie), metadata={**raw, "arch": "SRCNN"})
    with pytest.raises(WeightsError, match=r"lie\.safetensors: unknown architecture 'SRCNN'"):
        load_model(lie)
    with pytest.raises(WeightsError, match=r"e\.safetensors: is a x2 model, but --scale 4"):
        load_model(f, scale=4)


def test_save_model_refuses_unregistered_modules(tmp_path):
    with pytest.raises(TypeError, match="Conv2d is not a registered architecture"):
        save_model(torch.nn.Conv2d(3, 3, 1), tmp_path / "x.safetensors")


@pytest.mark.parametrize("name", ["rfdb", "edsr_baseline"])
def test_training_checkpoint_round_trip(tmp_path, name):
    m = build_model(name, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.rand(1, 3, 16, 16) * 255).mean().backward()
    opt.step()
    save_checkpoint(tmp_path, m, opt, TrainState(1, 1, "d"))
    m2 = build_model(name, 2)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "checkpoint", m2, opt2).iteration == 1
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ training end to end
def test_rlfn_train_ablation_model_cli(tmp_path, capsys):
    hr = tmp_path / "hr"
    hr.mkdir()
    for i in range(3):
        Image.fromarray(rgb(72 + 8 * i, 80, seed=i)).save(hr / f"img{i}.png")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"train": dict(
        model="rlfn", scale=4, hr_dir=str(hr), patch_size=64, batch_size=2, iterations=3,
        log_every=1, checkpoint_every=2, val_every=1000, num_workers=0, threads=1,
        epoch_iterations=3, amp="off", lr=1e-3)}))
    out = tmp_path / "out"
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(out),
               "--set", "model=rfdb_r48"])
    assert rc == 0, capsys.readouterr().err
    loaded = load_model(out / "model.safetensors", scale=4)
    assert loaded.name == "rfdb_r48" and isinstance(loaded.model, RFDN)
    assert not loaded.config.distillation and loaded.config.feature_channels == 48
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "rfdb_r48" and result["iterations"] == 3
    torch.manual_seed(0)  # the run's seed: the same initial weights as the run's
    initial = build_model("rfdb_r48", 4)
    assert not torch.equal(loaded.model.conv_1.weight, initial.conv_1.weight)
