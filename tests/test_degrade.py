"""LR generation from a manifest: bit-exact against MATLAB's LR, incremental, deterministic."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from imagefiles import make
from rlfn.data.degrade import degrade, image_key, items_from_manifest, load_index, lr_path
from rlfn.data.manifest import build_manifest, read_manifest
from rlfn.data.sources import ResolvedSource
from rlfn.io import read_image


def _manifest(tmp_path, folder, name="hr", split="train"):
    out = tmp_path / f"{name}.parquet"
    build_manifest([ResolvedSource(name, split, "folder", folder)], out, progress=False, workers=1)
    return read_manifest(out)


@pytest.mark.parametrize("bench, scale", [("Set5", 2), ("Set5", 3), ("Set5", 4), ("Set14", 3)])
def test_lr_through_the_stage_is_matlab_exact(benchmarks, tmp_path, bench, scale):
    hr_dir = benchmarks / bench / f"x{scale}" / "HR"
    items = items_from_manifest(_manifest(tmp_path, hr_dir, bench))
    s = degrade(items, [scale], tmp_path / "lr", workers=1, progress=False)
    assert s.made == len(items) and not s.errors
    for it in items:
        ours, _ = read_image(lr_path(tmp_path / "lr", scale, it.key))
        ref, _ = read_image(hr_dir.parent / "LR" / (it.key.split("__", 1)[1] + ".png"))
        assert np.array_equal(ours, ref), it.key


def test_incremental_deterministic_and_mirrors_the_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        make("good", src / f"im{i}.png", 40 + 4 * i, 36)
    make("text", src / "bad.png")
    out = tmp_path / "lr"
    items = items_from_manifest(_manifest(tmp_path, src))
    assert [i.key for i in items] == ["hr__im0", "hr__im1", "hr__im2"]  # bad.png not usable
    s1 = degrade(items, [2, 4], out, workers=2, progress=False)
    assert (s1.made, s1.reused) == (3, 0)
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}
    assert len(first) == 6
    s2 = degrade(items, [2, 4], out, workers=2, progress=False)
    assert (s2.made, s2.reused, s2.removed) == (0, 3, 0)
    # same bytes when everything is made again from scratch
    shutil.rmtree(out)
    degrade(items, [2, 4], out, workers=1, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")} == first
    # change one image, delete another: exactly those are redone / removed
    make("good", src / "im0.png", 48, 48)
    (src / "im2.png").unlink()
    items = items_from_manifest(_manifest(tmp_path, src))
    s3 = degrade(items, [2, 4], out, workers=1, progress=False)
    assert (s3.made, s3.reused, s3.removed) == (1, 1, 2)
    assert sorted(load_index(out)["images"]) == ["hr__im0", "hr__im1"]
    assert read_image(lr_path(out, 4, "hr__im0"))[0].shape == (12, 12, 3)


def test_bad_scale_and_key():
    with pytest.raises(ValueError, match="scales"):
        degrade([], [5], "/tmp/none")
    assert image_key("DIV2K train", "sub dir/0001.png") == "DIV2K_train__sub_dir__0001"
