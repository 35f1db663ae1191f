"""Models by name, official weights loading unchanged, safetensors round trip, bad checkpoints."""

from __future__ import annotations

import hashlib
import pickle
import zipfile

import pytest
import torch

from rlfn.models import RLFN, build_model, model_names
from rlfn.weights import WeightsError, infer_config, load_model, read_metadata, save_model

OFFICIAL = {  # file: (name, scale, params, sha256) from ../shared/README.md
    "rlfn_x4.pth": ("rlfn", 4, 543_740,
                    "8c7edb57dfc89048bafba29d591d4c27d4099964b4a9e22df23d6dc257a637c0"),
    "rlfn_x2.pth": ("rlfn", 2, 526_856,
                    "eafe5d5feeb122022453595c06d79160facdc157ae88deb02a44c50f5eba2d41"),
    "rlfn_s_x4.pth": ("rlfn_s", 4, 470_208,
                      "f769c5a88433786b2db0c2b24da6ca6c92a24c62344b9354a390f8a74388e89d"),
    "rlfn_s_x2.pth": ("rlfn_s", 2, 454_620,
                      "f5175f499f869c1b884c2552a1bcd6abd07ab352e3d8c8c9abe31b1deb60fe45"),
    "rlfn_ntire_x4.pth": ("rlfn_ntire", 4, 317_218,
                          "3c9be7b9d7a4bece9b68c83a56a1ffb38010f76413d5f215be6b4be842e18fb2"),
}


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("fname", sorted(OFFICIAL))
def test_official_param_counts_by_name(fname):
    name, scale, params, _ = OFFICIAL[fname]
    assert n_params(build_model(name, scale=scale)) == params


@pytest.mark.parametrize("name", ["rlfn", "rlfn_s", "rlfn_ntire"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_every_model_every_scale_shapes(name, scale):
    m = build_model(name, scale=scale).eval()
    with torch.no_grad():
        y = m(torch.rand(1, 3, 20, 24) * 255)
    assert y.shape == (1, 3, 20 * scale, 24 * scale)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'edsr'.*rlfn"):
        build_model("edsr")
    assert {"rlfn", "rlfn_ntire", "rlfn_s"} <= set(model_names())


@pytest.mark.parametrize("fname", sorted(OFFICIAL))
def test_official_weights_load_unchanged(pretrained, fname):
    path = pretrained / fname
    name, scale, params, sha = OFFICIAL[fname]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    sd = torch.load(path, map_location="cpu", weights_only=True)
    loaded = load_model(path)  # just the file: architecture and scale recognised
    assert (loaded.name, loaded.scale, n_params(loaded.model)) == (name, scale, params)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_safetensors_round_trip_with_metadata(tmp_path, pretrained):
    src = load_model(pretrained / "rlfn_s_x2.pth")
    out = save_model(src.model, tmp_path / "m.safetensors", provenance={"stage": 2, "iter": 7})
    meta = read_metadata(out)
    assert meta["model"] == "rlfn_s" and meta["scale"] == "2"
    assert meta["config"]["feature_channels"] == 48 and meta["provenance"] == {"stage": 2, "iter": 7}
    back = load_model(out, scale=2)
    assert back.name == "rlfn_s"
    x = torch.rand(1, 3, 24, 24) * 255
    with torch.no_grad():
        assert torch.equal(back.model(x), src.model(x))
    # the file holds no pickle: it is safetensors (8-byte header length, then JSON)
    assert out.read_bytes()[8:9] == b"{"


def test_scale_mismatch_is_refused(pretrained):
    with pytest.raises(WeightsError, match=r"rlfn_x4\.pth: is a x4 model, but --scale 2"):
        load_model(pretrained / "rlfn_x4.pth", scale=2)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/rlfn_pwned_marker",))


def test_pickle_with_code_is_refused_and_not_executed(tmp_path):
    import os

    marker = "/tmp/rlfn_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    bad = tmp_path / "evil.pth"
    torch.save({"conv_1.weight": torch.zeros(1), "payload": _Evil()}, bad)
    with pytest.raises(WeightsError) as ei:
        load_model(bad)
    assert str(bad) in str(ei.value) and "code" in str(ei.value)
    assert not os.path.exists(marker), "the pickled code ran"
    # the same with a bare pickle file (not a torch zip archive)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(WeightsError):
        load_model(raw)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "not_rlfn", "tensor", "missing",
                                  "truncated_safetensors"])
def test_bad_checkpoints_named_in_error(tmp_path, kind):
    p = tmp_path / f"{kind}.pth"
    if kind == "text":
        p.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        torch.save(build_model("rlfn_s", 2).state_dict(), p)
        p.write_bytes(p.read_bytes()[:5000])
    elif kind == "not_rlfn":
        torch.save(torch.nn.Linear(3, 4).state_dict(), p)
    elif kind == "tensor":
        torch.save(torch.zeros(3), p)
    elif kind == "truncated_safetensors":
        p = save_model(build_model("rlfn_s", 2), tmp_path / "t.safetensors")
        p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(WeightsError) as ei:
        load_model(p)
    assert str(p) in str(ei.value)
    assert "\n" not in str(ei.value)


def test_other_architecture_shapes_refused(tmp_path):
    sd = build_model("rlfn", 4).state_dict()
    sd["block_2.c1_r.weight"] = torch.zeros(10, 52, 3, 3)
    p = tmp_path / "odd.pth"
    torch.save(sd, p)
    with pytest.raises(WeightsError, match="odd.pth"):
        load_model(p)


def test_wrapped_and_ddp_state_dicts(tmp_path):
    m = build_model("rlfn_ntire", 4)
    p = tmp_path / "wrapped.pth"
    torch.save({"params": {f"module.{k}": v for k, v in m.state_dict().items()}}, p)
    assert load_model(p).name == "rlfn_ntire"


def test_infer_config_custom_arch():
    m = RLFN(scale=3, feature_channels=24, mid_channels=16, num_blocks=2, esa_channels=8)
    c = infer_config(m.state_dict())
    assert (c.scale, c.feature_channels, c.mid_channels, c.num_blocks, c.esa_channels) == (
        3, 24, 16, 2, 8)


def test_zip_checkpoint_layout_is_torch_zip(tmp_path):
    # our .pth fixtures above are real torch zip archives (not hand-made bytes)
    p = tmp_path / "a.pth"
    torch.save(build_model("rlfn_s", 2).state_dict(), p)
    assert zipfile.is_zipfile(p)


def test_saved_weights_are_byte_identical_in_every_process(tmp_path):
    """safetensors writes its metadata map in hash order (random per process); save_model
    sorts it, so the same weights give the same file bytes and DVC hash on every run."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom rlfn.models import build_model\n"
            "from rlfn.weights import save_model\ntorch.manual_seed(0)\n"
            "save_model(build_model('rlfn_ntire', 4), sys.argv[1], "
            "{'stage': 3, 'seed': 0, 'init': 'x', 'iteration': 7, 'config_digest': 'd'})\n")
    files = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, timeout=120)
    assert len({f.read_bytes() for f in files}) == 1
