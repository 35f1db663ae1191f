"""The patch store (rlfn.data.patches) and the training Dataset (rlfn.data.dataset)."""

from __future__ import annotations

import itertools
import json
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rlfn.errors import DataError
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rlfn.bicubic import downscale, modcrop
from rlfn.data.dataset import Crop, PatchDataset, dihedral
from rlfn.data.patches import (PatchStore, build_patch_store, sidecar_path,
                               sub_image_grid)

SCALE = 4
# HR sizes (h, w); the second is not a multiple of the scale and gets mod-cropped
SIZES = [(64, 80), (71, 58), (48, 52)]


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[str, Path, Path]]:
    """Three HR PNGs with their MATLAB-bicubic x4 LR PNGs."""
    d = tmp_path_factory.mktemp("pairs")
    out = []
    for i, (h, w) in enumerate(SIZES):
        hr = noise(h, w, i)
        out.append((f"img{i}", save(d / f"hr{i}.png", hr),
                    save(d / f"lr{i}.png", downscale(hr, SCALE))))
    return out


@pytest.fixture(scope="module")
def store(pairs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "x4.arrow"
    build_patch_store(pairs, SCALE, path, progress=False)
    return path


def full_images(pairs):
    """key -> (mod-cropped HR, LR) as the store should hold them."""
    return {k: (modcrop(np.asarray(Image.open(h)), SCALE), np.asarray(Image.open(lr)))
            for k, h, lr in pairs}


# ---------------------------------------------------------------- building the store

def test_store_holds_the_mod_cropped_pairs_in_key_order(pairs, store):
    full = full_images(pairs)
    with PatchStore(store) as s:
        assert s.scale == SCALE and s.sub_image is None
        assert s.keys == sorted(full)
        for i, key in enumerate(s.keys):
            hr, lr = full[key]
            assert (s.height[i], s.width[i]) == hr.shape[:2]
            assert hr.shape[0] % SCALE == 0 and hr.shape[1] % SCALE == 0
            np.testing.assert_array_equal(s.hr(i), hr)
            np.testing.assert_array_equal(s.lr(i), lr)


def test_sidecar_summarises_the_store(store):
    info = json.loads(sidecar_path(store).read_text())
    assert sidecar_path(store).name == "x4.json"
    assert info["scale"] == SCALE and info["sub_image"] is None
    assert info["images"] == info["records"] == len(SIZES)
    assert info["min_record_hw"] == [48, 52] and info["max_record_hw"] == [68, 80]
    assert info["hr_bytes"] == sum((h - h % 4) * (w - w % 4) * 3 for h, w in SIZES)
    assert info["file_bytes"] == store.stat().st_size


def test_missing_lr_is_made_by_matlab_bicubic(pairs, tmp_path):
    path = tmp_path / "gen.arrow"
    info = build_patch_store([(k, h, None) for k, h, _ in pairs], SCALE, path, progress=False)
    assert json.loads(sidecar_path(path).read_text()) == asdict(info)
    full = full_images(pairs)
    with PatchStore(path) as s:
        for i, key in enumerate(s.keys):
            np.testing.assert_array_equal(s.lr(i), downscale(full[key][0], SCALE))


def test_rebuild_is_byte_identical_whatever_the_input_order(pairs, store, tmp_path):
    again = tmp_path / "again.arrow"
    build_patch_store(list(reversed(pairs)), SCALE, again, progress=False)
    assert again.read_bytes() == store.read_bytes()
    assert sidecar_path(again).read_text().replace("again.arrow", "x4.arrow") == \
        sidecar_path(store).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.arrow", "again.json"]


def test_sub_image_grid_covers_the_length_with_a_border_aligned_last_window():
    assert sub_image_grid(20, 8, 4) == [0, 4, 8, 12]
    assert sub_image_grid(22, 8, 4) == [0, 4, 8, 12, 14]
    assert sub_image_grid(8, 8, 4) == [0]
    assert sub_image_grid(5, 8, 4) == [0]


@pytest.mark.parametrize("size,step", [(24, 16), (32, 32), (100, 40)])
def test_sub_images_cover_every_pixel_and_match_the_full_images(pairs, tmp_path, size, step):
    path = tmp_path / "sub.arrow"
    info = build_patch_store(pairs, SCALE, path, sub_image=(size, step), progress=False)
    full = full_images(pairs)
    with PatchStore(path) as s:
        assert s.sub_image == (size, step) and info.records == len(s) > 0
        covered = {k: np.zeros(hr.shape[:2], bool) for k, (hr, _) in full.items()}
        for i in range(len(s)):
            hr, lr = full[s.keys[i]]
            y, x, h, w = int(s.y[i]), int(s.x[i]), int(s.height[i]), int(s.width[i])
            assert (h, w) == (min(size, hr.shape[0]), min(size, hr.shape[1]))
            assert y % SCALE == 0 and x % SCALE == 0
            np.testing.assert_array_equal(s.hr(i), hr[y:y + h, x:x + w])
            np.testing.assert_array_equal(
                s.lr(i), lr[y // SCALE:(y + h) // SCALE, x // SCALE:(x + w) // SCALE])
            covered[s.keys[i]][y:y + h, x:x + w] = True
        assert all(c.all() for c in covered.values())


def test_store_is_memory_mapped_not_read_into_ram(tmp_path):
    # ~6 MB of pixels: far more than the Arrow allocations an open store may make
    d = tmp_path / "big"
    d.mkdir()
    big = [(f"b{i}", save(d / f"{i}.png", noise(512, 640, i)), None) for i in range(2)]
    path = tmp_path / "big.arrow"
    build_patch_store(big, 2, path, progress=False)
    before = pa.total_allocated_bytes()
    ds = PatchDataset(path, 64, 2, samples_per_epoch=16)
    samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == 16
    store = ds._store
    assert isinstance(store._mmap, pa.MemoryMappedFile)
    assert not store.hr(0).flags.writeable  # a view into the read-only map, not a copy
    assert pa.total_allocated_bytes() - before < 64 * 1024
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) in maps.read_text()


def test_size_mismatch_names_the_file_and_both_sizes(pairs, tmp_path):
    key, hr, _ = pairs[0]
    bad = save(tmp_path / "wrong.png", noise(15, 20, 0))  # HR 64x80 at x4 needs 20x16 LR
    with pytest.raises(ValueError, match=r"wrong\.png: LR is 20x15 .* must be 20x16"):
        build_patch_store([(key, hr, bad)], SCALE, tmp_path / "x.arrow", progress=False)
    assert list(tmp_path.iterdir()) == [bad]  # nothing half-written


@pytest.mark.parametrize("kwargs,msg", [
    ({"sub_image": (30, 16)}, "multiples of the scale"),
    ({"sub_image": (16, 32)}, "step 32 exceeds size 16"),
    ({"scale": 0}, "positive integer"),
])
def test_bad_build_arguments(pairs, tmp_path, kwargs, msg):
    args = {"scale": SCALE, **kwargs}
    with pytest.raises(ValueError, match=msg):
        build_patch_store(pairs, out_path=tmp_path / "x.arrow", progress=False, **args)


def test_bad_pair_lists(pairs, tmp_path):
    with pytest.raises(ValueError, match="duplicate pair keys: img0"):
        build_patch_store(pairs + pairs[:1], SCALE, tmp_path / "x.arrow", progress=False)
    with pytest.raises(ValueError, match="no image pairs"):
        build_patch_store([], SCALE, tmp_path / "x.arrow", progress=False)
    with pytest.raises(ValueError, match="key: non-empty str"):
        build_patch_store([(1, pairs[0][1], None)], SCALE, tmp_path / "x.arrow", progress=False)


# ---------------------------------------------------------------- the dataset

def test_samples_are_the_aligned_crops_after_the_same_augmentation(pairs, store):
    full = full_images(pairs)
    ds = PatchDataset(store, 32, SCALE, seed=3, samples_per_epoch=40)
    with PatchStore(store) as s:
        keys = s.keys
    for pos in range(40):
        c = ds.crop_params(0, pos)
        lr, hr = ds[pos]
        assert lr.dtype == hr.dtype == torch.float32
        assert lr.shape == (3, 8, 8) and hr.shape == (3, 32, 32)
        full_hr, full_lr = full[keys[c.record]]
        want_hr = dihedral(full_hr[c.y:c.y + 32, c.x:c.x + 32], c.aug)
        want_lr = dihedral(full_lr[c.y // 4:c.y // 4 + 8, c.x // 4:c.x // 4 + 8], c.aug)
        np.testing.assert_array_equal(hr.permute(1, 2, 0).numpy(), want_hr)
        np.testing.assert_array_equal(lr.permute(1, 2, 0).numpy(), want_lr)


@pytest.mark.parametrize("scale", [2, 3])
def test_lr_and_hr_stay_aligned_under_every_augmentation(tmp_path, scale):
    """HR made of constant scale x scale blocks whose values are the LR pixels: any aligned
    crop, flipped or rotated the same way, still satisfies HR == LR upsampled by repetition."""
    d = tmp_path
    items = []
    for i, (h, w) in enumerate([(20, 25), (18, 30)]):
        lr = noise(h, w, 10 + i)
        hr = np.repeat(np.repeat(lr, scale, 0), scale, 1)
        items.append((f"k{i}", save(d / f"h{i}.png", hr), save(d / f"l{i}.png", lr)))
    path = d / "blocks.arrow"
    build_patch_store(items, scale, path, progress=False)
    ds = PatchDataset(path, 12 * scale, scale, seed=1, samples_per_epoch=200)
    augs = set()
    for i in range(len(ds)):
        lr, hr = ds[i]
        up = lr.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        assert torch.equal(up, hr), ds.crop_params(0, i)
        augs.add(ds.crop_params(0, i).aug)
    assert augs == set(range(8))


def test_the_eight_augmentations_are_distinct():
    img = noise(6, 6, 0)
    outs = [dihedral(img, a) for a in range(8)]
    assert all(o.shape == img.shape for o in outs)
    for a, b in itertools.combinations(range(8), 2):
        assert not np.array_equal(outs[a], outs[b]), (a, b)


def test_no_augmentation_keeps_the_crop_positions(store):
    on = PatchDataset(store, 32, SCALE, augment=True, samples_per_epoch=50)
    off = PatchDataset(store, 32, SCALE, augment=False, samples_per_epoch=50)
    for pos in range(50):
        a, b = on.crop_params(0, pos), off.crop_params(0, pos)
        assert b.aug == 0 and a._replace(aug=0) == b
    assert len({on.crop_params(0, p).aug for p in range(50)}) > 1


def test_samples_are_a_pure_function_of_seed_epoch_position(store):
    a = PatchDataset(store, 32, SCALE, seed=7, samples_per_epoch=30)
    b = PatchDataset(store, 32, SCALE, seed=7, samples_per_epoch=30)
    b.set_epoch(2)
    b[5]  # touch another epoch first: no state may leak between samples
    b.set_epoch(0)
    for i in reversed(range(30)):
        la, ha = a[i]
        lb, hb = b[i]
        assert torch.equal(la, lb) and torch.equal(ha, hb)
    assert a.sample(3, 11)[1].equal(b.sample(3, 11)[1])

    def crops(ds, epoch):
        return [ds.crop_params(epoch, p) for p in range(30)]

    assert crops(a, 0) != crops(a, 1)
    assert sum(x != y for x, y in zip(crops(a, 0), crops(a, 1))) > 20
    other = PatchDataset(store, 32, SCALE, seed=8, samples_per_epoch=30)
    assert crops(other, 0) != crops(a, 0)


def test_each_epoch_visits_every_record_equally_often(store):
    ds = PatchDataset(store, 32, SCALE, seed=0, samples_per_epoch=3 * len(SIZES))
    for epoch in range(3):
        records = [ds.crop_params(epoch, p).record for p in range(len(ds))]
        assert sorted(records) == sorted(list(range(len(SIZES))) * 3)


def test_dataloader_workers_give_the_same_samples(store):
    ds = PatchDataset(store, 32, SCALE, seed=5, samples_per_epoch=24)
    ds.set_epoch(1)
    direct = [ds[i] for i in range(len(ds))]
    assert ds._store is not None  # opened here: the workers must not receive it
    state = pickle.dumps(ds)
    assert len(state) < 10_000 and pickle.loads(state)._store is None
    loader = DataLoader(ds, batch_size=5, num_workers=2)
    got = [(lr, hr) for lrs, hrs in loader for lr, hr in zip(lrs, hrs)]
    assert len(got) == len(direct)
    for (la, ha), (lb, hb) in zip(direct, got):
        assert torch.equal(la, lb) and torch.equal(ha, hb)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_each_global_batch_disjointly(store, world_size):
    batch, n = 8, 36  # 4 full global batches; the last 4 positions are dropped
    single = PatchDataset(store, 32, SCALE, seed=2, samples_per_epoch=n)
    single.set_epoch(1)
    full = list(DataLoader(single, batch_sampler=single.batch_sampler(batch)))
    assert len(full) == single.steps_per_epoch(batch) == 4
    ranks = []
    for r in range(world_size):
        ds = PatchDataset(store, 32, SCALE, seed=2, samples_per_epoch=n, rank=r,
                          world_size=world_size)
        ds.set_epoch(1)
        ranks.append(list(DataLoader(ds, batch_sampler=ds.batch_sampler(batch))))
    for step, (lr_all, hr_all) in enumerate(full):
        positions = []
        for r in range(world_size):
            lr, hr = ranks[r][step]
            assert lr.shape[0] == batch // world_size
            # interleaved: rank r holds every world_size-th sample of the global batch
            assert torch.equal(lr, lr_all[r::world_size]) and torch.equal(hr, hr_all[r::world_size])
            positions += [step * batch + t * world_size + r for t in range(batch // world_size)]
        assert sorted(positions) == list(range(step * batch, (step + 1) * batch))


def test_resume_mid_epoch_continues_with_the_same_batches(store):
    ds = PatchDataset(store, 32, SCALE, seed=4, samples_per_epoch=30)
    ds.set_epoch(3)
    every = list(DataLoader(ds, batch_sampler=ds.batch_sampler(6)))
    resumed = list(DataLoader(ds, batch_sampler=ds.batch_sampler(6, start_step=2), num_workers=1))
    assert len(every) == 5 and len(resumed) == 3
    for (la, ha), (lb, hb) in zip(every[2:], resumed):
        assert torch.equal(la, lb) and torch.equal(ha, hb)
    assert ds.batch_sampler(6, start_step=5) == []


def test_crop_params_are_inside_the_record(store):
    ds = PatchDataset(store, 48, SCALE, samples_per_epoch=300)
    with PatchStore(store) as s:
        for p in range(300):
            c = ds.crop_params(0, p)
            assert isinstance(c, Crop) and c.y % SCALE == 0 and c.x % SCALE == 0
            assert 0 <= c.y <= s.height[c.record] - 48 and 0 <= c.x <= s.width[c.record] - 48


def test_patch_too_large_names_the_image(store):
    with pytest.raises(ValueError, match=r"patch_size 52 does not fit image 'img2'.*52x48"):
        PatchDataset(store, 52, SCALE)


@pytest.mark.parametrize("kwargs,msg", [
    ({"patch_size": 30}, "not divisible by the scale 4"),
    ({"scale": 2}, "built for x4, not x2"),
    ({"rank": 2, "world_size": 2}, r"rank must be in \[0, 2\)"),
    ({"seed": -1}, "seed must be"),
    ({"samples_per_epoch": 0}, "samples_per_epoch must be a positive integer"),
])
def test_bad_dataset_arguments(store, kwargs, msg):
    args = {"patch_size": 32, "scale": SCALE, **kwargs}
    with pytest.raises(ValueError, match=msg):
        PatchDataset(store, **args)


def test_bad_batches_and_stores(store, tmp_path):
    ds = PatchDataset(store, 32, SCALE, world_size=4)
    with pytest.raises(ValueError, match="not divisible by world_size 4"):
        ds.batch_sampler(6)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(DataError, match="no such patch store"):
        PatchStore(tmp_path / "none.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="not an Arrow IPC file"):
        PatchStore(tmp_path / "junk.arrow")
    with pytest.raises(TypeError, match="cannot be pickled"):
        with PatchStore(store) as s:
            pickle.dumps(s)
