"""In-plane handling "resize" | "patch" and the cache's target_spacing (issue #15 item 1).

    OMP_NUM_THREADS=1 python -m pytest tests/test_inplane.py -q

Resize mode is covered by the existing dataset tests (tests/test_pipeline.py, tests/test_aux.py),
which run unchanged; here: patch items are exact crops of the cached slices (padding included),
tumour items hold tumour, the geometric augmentation / aux targets / misalignment work on crops,
the one inference path (`inference.predict_study`) is the one validation and evaluation take,
the cache's in-plane resampling and the mapping back to the study's own grid, and a whole run
(`main.main --preset=tiny --inplane=patch --img_size=32`) on slices larger than the network input.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PetThreshold, write_toy_run
import torch.nn.functional as F

import config
import factory
import inference
import test as evaluation
import training
from data.cache import cache_key, load_cached, prepare_cache
from data.dataset import PAD_VALUE, PetCtSliceDataset, affine_theta, crop_or_pad
from data.geometry import inplane_grid
from data.study import DataError, Study
from data.targets import uptake_from_channel


pytestmark = pytest.mark.usefixtures("one_thread")


def study(case_id="P1", shape=(40, 12, 6), spacing=(2.0, 2.0, 3.0), lesion=None, seed=0,
          organs=False) -> Study:
    """Random CT / PET; `lesion` = (x slice, y slice, z slice) of tumour voxels (SUV raised)."""
    rng = np.random.default_rng(seed)
    ct = rng.uniform(-1000, 1000, shape).astype(np.float32)
    pet = rng.uniform(0, 20, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    if lesion is not None:
        mask[lesion] = 1
    labels = None
    if organs:
        labels = np.where(mask > 0, 1, 2 + (np.arange(shape[1])[None, :, None] > shape[1] // 2)).astype(np.uint8)
        labels = np.broadcast_to(labels, shape).copy()
    return Study(ct=ct, pet=pet, mask=mask, spacing=spacing, affine=np.diag([*spacing, 1.0]),
                 case_id=case_id, patient_id=case_id, source=f"memory:{case_id}", organs=labels)


def expected_crop(cached, k_z_crop, size, context=0):
    """The S x S window of the cached slice (image float32 from float16, mask), -1 / 0 outside."""
    _, z, (x0, y0) = k_z_crop
    image = np.asarray(cached.image()[z], np.float32)  # (2, X, Y)
    mask = np.asarray(cached.mask()[z], np.float32)  # (X, Y)
    out_i = np.full((2, size, size), PAD_VALUE, np.float32)
    out_m = np.zeros((size, size), np.float32)
    for a in range(size):
        for b in range(size):
            x, y = x0 + a, y0 + b
            if 0 <= x < image.shape[1] and 0 <= y < image.shape[2]:
                out_i[:, a, b] = image[:, x, y]
                out_m[a, b] = mask[x, y]
    return out_i, out_m


# ---- config ------------------------------------------------------------------------------------

def test_config_keys_and_their_checks():
    cfg = config.make_config({"inplane": "patch", "target_spacing": 3, "patch_overlap": 0.75})
    assert cfg.inplane == "patch" and cfg.target_spacing == 3.0 and cfg.patch_overlap == 0.75
    assert config.Config().inplane == "resize" and config.Config().target_spacing is None
    for bad, key in (({"inplane": "crop"}, "--inplane"),
                     ({"inplane": "patch", "patch_overlap": 0.4}, "--patch_overlap"),
                     ({"inplane": "patch", "patch_overlap": 1.0}, "--patch_overlap"),
                     ({"inplane": "patch", "target_spacing": 0}, "--target_spacing"),
                     ({"target_spacing": 2.0}, "--inplane=patch"),  # does nothing in resize mode
                     ({"patch_overlap": 0.75}, "--inplane=patch")):
        with pytest.raises(config.ConfigError, match=key):
            config.make_config(bad)


def test_inference_options_are_what_validation_uses():
    cfg = config.make_config({"preset": "tiny", "inplane": "patch", "patch_overlap": 0.75})
    options = factory.inference_options(cfg)
    assert options == dict(inplane="patch", img_size=64, overlap=0.75, batch_size=16, context_slices=0)
    loop = training.build_loop(torch.nn.Conv2d(2, 1, 1), None, torch.device("cpu"),
                               training.StopSignal(), training.TrainSettings.from_config(cfg), 10)
    assert {k: v for k, v in loop.validation.items() if k != "amp_dtype"} == options


# ---- dataset: patch items ----------------------------------------------------------------------

def test_crop_or_pad_by_hand():
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4)
    out = crop_or_pad(x, (-2, 1), 4, -1.0)  # rows -2..1, columns 1..4 (4 is outside)
    assert out.shape == (2, 4, 4)
    assert torch.equal(out[:, :2], torch.full((2, 2, 4), -1.0))  # rows -2, -1
    assert torch.equal(out[:, 2:, :3], x[:, 0:2, 1:4]) and torch.equal(out[:, 2:, 3], torch.full((2, 2), -1.0))
    assert torch.equal(crop_or_pad(x, (0, 0), 4, 0.0), x[:, :4, :4])
    assert torch.equal(crop_or_pad(x, (3, 2), 2, 0.0), x[:, 3:5, 2:4])


@pytest.fixture(scope="module")
def patch_cache(tmp_path_factory):
    """Slices of 40 x 12: larger than a 16 patch along X, smaller along Y (always padded)."""
    lesion = (slice(30, 33), slice(8, 11), slice(2, 4))
    return prepare_cache([study("P1", lesion=lesion), study("P2", seed=1)],
                         tmp_path_factory.mktemp("patch"), progress=False)


def test_patch_item_is_the_exact_crop_of_the_cached_slice(patch_cache):
    ds = PetCtSliceDataset(patch_cache, img_size=16, fg_fraction=0.3, augment=False,
                           samples_per_epoch=80, seed=0, inplane="patch")
    starts_x, starts_y = set(), set()
    for i in range(len(ds)):
        image, mask = ds[i]
        k, z, (x0, y0) = where = ds.locate(i)
        want_image, want_mask = expected_crop(patch_cache[k], where, 16)
        assert image.shape == (2, 16, 16) and mask.shape == (1, 16, 16)
        assert torch.equal(image, torch.from_numpy(want_image))  # exact values, padding -1
        assert torch.equal(mask[0], torch.from_numpy(want_mask))
        starts_x.add(x0), starts_y.add(y0)
    assert {0, 24} <= starts_x  # crops flush with both borders of the 40-pixel axis
    assert starts_y <= set(range(-4, 1)) and len(starts_y) >= 3  # the 12-pixel axis: padded, moved


def test_other_items_are_placed_uniformly(patch_cache):
    """fg_fraction 0: every crop start of the allowed range (0..24 along the 40-pixel axis,
    -4..0 along the 12-pixel one) is drawn, with a uniform mean."""
    ds = PetCtSliceDataset(patch_cache, img_size=16, fg_fraction=0.0, augment=False,
                           samples_per_epoch=1000, seed=1, inplane="patch")
    starts = np.array([ds.locate(i)[2] for i in range(len(ds))])  # (1000, 2)
    assert set(starts[:, 0]) == set(range(0, 25)) and set(starts[:, 1]) == set(range(-4, 1))
    assert abs(starts[:, 0].mean() - 12) < 1.0 and abs(starts[:, 1].mean() + 2) < 0.25


def test_tumour_items_contain_tumour_not_always_centred(patch_cache):
    ds = PetCtSliceDataset(patch_cache, img_size=16, fg_fraction=1.0, augment=False,
                           samples_per_epoch=60, seed=2, inplane="patch")
    centres = set()
    for i in range(len(ds)):
        _, mask = ds[i]
        assert mask.sum() > 0, i  # the crop holds the chosen tumour voxel
        xs, ys = np.nonzero(mask[0].numpy())
        centres.add((int(xs.mean()), int(ys.mean())))
    assert len(centres) >= 4  # random offsets: the tumour is not always at the same place
    augmented = PetCtSliceDataset(patch_cache, img_size=16, fg_fraction=1.0, augment=True,
                                  samples_per_epoch=60, seed=2, inplane="patch")
    assert all(augmented[i][1].sum() > 0 for i in range(len(augmented)))


def test_patch_items_are_deterministic_and_resize_draws_are_unchanged(patch_cache):
    make = lambda mode: PetCtSliceDataset(patch_cache, img_size=16, samples_per_epoch=20, seed=5,
                                          inplane=mode)
    a, b = make("patch"), make("patch")
    assert all(torch.equal(x, y) for i in (0, 7, 19) for x, y in zip(a[i], b[i]))
    resize = make("resize")
    for i in range(20):  # the crop has its own stream: the slice choice is that of resize mode
        assert a.locate(i)[:2] == resize.locate(i)[:2] and resize.locate(i)[2] is None
    epoch0 = [a.locate(i) for i in range(20)]
    a.set_epoch(1)
    assert [a.locate(i) for i in range(20)] != epoch0
    with pytest.raises(DataError, match="inplane='tile'"):
        make("tile")


@pytest.mark.parametrize("shape", [(48, 40), (40, 48)])
def test_affine_theta_without_rotation_samples_the_crop(shape):
    """The patch-mode sampling grid (translation to the crop centre, scale S / n) with angle 0
    and zoom 1 lands on pixel centres: grid_sample reproduces the exact crop."""
    torch.manual_seed(0)
    x = torch.rand(1, 2, *shape)
    for crop in ((0, 0), (5, 17), (32, 24), (-3, 30)):
        theta = affine_theta(0.0, 1.0, 16, crop, shape)
        grid = F.affine_grid(theta, [1, 1, 16, 16], align_corners=False)
        out = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)[0] - 1.0
        torch.testing.assert_close(out, crop_or_pad(x[0], crop, 16, -1.0), atol=1e-5, rtol=0)
    # resize mode (crop None) is the matrix the dataset always used
    cos, sin = 1.1 * math.cos(0.3), 1.1 * math.sin(0.3)
    assert torch.equal(affine_theta(0.3, 1.1, 16), torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]]))


def test_rotated_crop_takes_tissue_from_beyond_its_edges(tmp_path):
    """A uniform slice: a rotated resize-mode item gets air (-1) in its corners, a rotated crop
    inside a larger slice does not (one sampling grid over the whole slice)."""
    s = study(shape=(64, 64, 2))
    s.ct[:], s.pet[:] = 0.0, 10.0  # both channels 0 in the cache
    (cs,) = prepare_cache([s], tmp_path, progress=False)
    kw = dict(img_size=16, fg_fraction=0.0, augment=True, samples_per_epoch=40, seed=0)
    patch, resize = PetCtSliceDataset([cs], **kw, inplane="patch"), PetCtSliceDataset([cs], **kw)
    corners_resize, corners_patch = 0, 0
    for i in range(40):
        x0, y0 = patch.locate(i)[2]
        interior = 4 <= x0 <= 44 and 4 <= y0 <= 44  # >= 4 pixels of tissue around the crop
        image = patch[i][0]
        if interior:
            corners_patch += int((image[0] < -0.5).any())
        corners_resize += int((resize[i][0][0] < -0.5).any())
    assert corners_resize >= 5 and corners_patch == 0


def test_aux_and_misalignment_work_on_crops(tmp_path):
    lesion = (slice(20, 24), slice(30, 34), slice(1, 3))
    s = study(shape=(48, 48, 4), lesion=lesion, organs=True)
    s.ct[10:20, 10:20] = 900.0
    (cs,) = prepare_cache([s], tmp_path, progress=False)
    kw = dict(img_size=16, fg_fraction=0.5, augment=True, samples_per_epoch=30, seed=1,
              inplane="patch", aux_target="organs", aux_classes=4)
    base = PetCtSliceDataset([cs], **kw)
    plain = PetCtSliceDataset([cs], **{k: v for k, v in kw.items() if k not in ("aux_target", "aux_classes")})
    mis = PetCtSliceDataset([cs], **kw, p_misalign=1.0)
    changed = 0
    for i in range(len(base)):
        image, mask, aux = base[i]
        assert aux.shape == (16, 16) and aux.dtype == torch.int64
        assert torch.equal(aux == 1, mask[0] == 1)  # label 1 sits exactly on the tumour
        assert torch.equal(image, plain[i][0]) and torch.equal(mask, plain[i][1])
        m_image, m_mask, m_aux = mis[i]
        assert torch.equal(image[1], m_image[1]) and torch.equal(mask, m_mask) and torch.equal(aux, m_aux)
        changed += not torch.allclose(image[0], m_image[0], atol=1e-3)
    assert changed >= 10  # the CT moved against the PET in the crops


def test_uptake_target_on_crops_without_augmentation(tmp_path):
    s = study(shape=(40, 40, 3), lesion=(slice(5, 8), slice(5, 8), slice(0, 3)))
    (cs,) = prepare_cache([s], tmp_path, progress=False)
    ds = PetCtSliceDataset([cs], img_size=16, augment=False, samples_per_epoch=10, seed=0,
                           inplane="patch", aux_target="uptake", uptake_suv=3.0)
    for i in range(len(ds)):
        _, mask, aux = ds[i]
        _, z, crop = ds.locate(i)
        hot = uptake_from_channel(np.asarray(cs.image()[z, 1], np.float32), np.asarray(cs.mask()[z]),
                                  20.0, 3.0)  # (X, Y) on the whole slice
        want = np.zeros((16, 16), np.int64)  # its crop, by hand
        for a in range(16):
            for b in range(16):
                if 0 <= crop[0] + a < 40 and 0 <= crop[1] + b < 40:
                    want[a, b] = hot[crop[0] + a, crop[1] + b]
        assert torch.equal(aux, torch.from_numpy(want))


# ---- inference: one path -----------------------------------------------------------------------

class PixelModel(torch.nn.Module):
    def forward(self, x):
        return 4.0 * x[:, 1:2] - x[:, :1]


class FakeStudy:
    def __init__(self, image):
        self._image = image.astype(np.float16)
        self.shape = (image.shape[2], image.shape[3], image.shape[0])
        self.case_id = "fake"

    def image(self):
        return self._image


def test_predict_study_picks_the_path(monkeypatch):
    rng = np.random.default_rng(0)
    fake = FakeStudy(rng.uniform(-1, 1, (3, 2, 40, 28)))
    kw = dict(img_size=16, batch_size=4, device="cpu")
    sliding = inference.predict_study(PixelModel(), fake, inplane="patch", overlap=0.5, **kw)
    resized = inference.predict_study(PixelModel(), fake, inplane="resize", **kw)
    assert sliding.shape == resized.shape == (40, 28, 3)
    x = fake.image().astype(np.float32)
    exact = 1 / (1 + np.exp(-(4 * x[:, 1] - x[:, 0])))  # (Z, X, Y): a per-pixel model, no resizing
    np.testing.assert_allclose(sliding, np.moveaxis(exact, 0, -1), atol=1e-5)
    assert np.abs(resized - np.moveaxis(exact, 0, -1)).max() > 0.05  # 40 x 28 -> 16² and back
    with pytest.raises(ValueError, match="inplane='tiles'"):
        inference.predict_study(PixelModel(), fake, inplane="tiles", **kw)


def test_sliding_window_non_finite_logits_name_the_study():
    class Inf(torch.nn.Module):
        def forward(self, x):
            return x[:, :1] * float("inf")

    with pytest.raises(inference.NonFiniteError, match="study fake"):
        inference.predict_volume_sliding(Inf(), FakeStudy(np.ones((2, 2, 20, 20))), patch=16)


# ---- cache: target_spacing ---------------------------------------------------------------------

def test_inplane_grid_keeps_the_field_of_view_centre():
    affine = np.array([[-2.0, 0, 0, 30.0], [0, 2.5, 0, -40.0], [0, 0, 3.0, -500.0], [0, 0, 0, 1]])
    shape, new = inplane_grid((12, 10, 8), affine, 3.0)
    assert shape == (8, 9, 8)  # ceil(24 / 3) = 8, ceil(25 / 3) = 9
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), [3.0, 3.0, 3.0])
    centre = lambda a, n: a @ np.array([(n[0] - 1) / 2, (n[1] - 1) / 2, 0.0, 1.0])
    np.testing.assert_allclose(centre(new, shape), centre(affine, (12, 10, 8)), atol=1e-9)
    assert np.sign(new[0, 0]) == -1  # the axis directions are kept


def test_target_spacing_resamples_once_and_maps_back(tmp_path):
    shape = (30, 24, 5)
    s = study(shape=shape, lesion=(slice(10, 16), slice(8, 14), slice(1, 4)), organs=True)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None]
    s.pet = np.broadcast_to(0.5 * x + 1.0, shape).astype(np.float32).copy()  # linear in x: SUV 1..15.5
    (native,) = prepare_cache([s], tmp_path, progress=False)
    (cs,) = prepare_cache([s], tmp_path, target_spacing=3.0, progress=False)
    assert Path(cs.directory).parent.name == cache_key((-1000, 1000), 20, 3.0) != cache_key((-1000, 1000), 20)
    assert Path(native.directory).parent.name == cache_key((-1000, 1000), 20)  # old key unchanged
    assert not native.resampled and native.original_shape is None
    assert cs.resampled and cs.shape == (20, 16, 5) and cs.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert cs.original_shape == shape and np.allclose(cs.original_affine, s.affine)
    assert cs.image().shape == (5, 2, 20, 16) and cs.mask().shape == (5, 20, 16)
    assert load_cached(cs.directory) == cs and cs.fg_slices == [1, 2, 3]
    # PET linear: new index j sits at old x = 14.5 + (j - 9.5) * 1.5 (same centre), SUV 0.5 x + 1
    old_x = 14.5 + (np.arange(20) - 9.5) * 1.5
    suv = (np.asarray(cs.image()[2, 1], np.float32) + 1) * 10  # (20, 16)
    np.testing.assert_allclose(suv[1:-1], np.broadcast_to((0.5 * old_x + 1)[1:-1, None], (18, 16)), atol=0.02)
    # mask / organs nearest: still labels, the lesion in the same place in mm
    mask = np.asarray(cs.mask())
    assert set(np.unique(mask)) == {0, 1} and set(np.unique(np.asarray(cs.organs()))) <= {0, 1, 2, 3}
    xs = np.nonzero(mask[2].any(axis=1))[0]
    assert abs((old_x[xs].mean()) - 12.5) < 1.0  # lesion centre at old x = 12.5
    # back onto the original grid (linear): a function linear in x comes back exactly inside
    prob = np.broadcast_to(((old_x - old_x.min()) / 30)[:, None, None], cs.shape).astype(np.float32)
    back = cs.to_original(prob)
    assert back.shape == shape and back.dtype == np.float32
    np.testing.assert_allclose(back[1:-1, :, 0], np.broadcast_to(((x[1:-1, 0, 0] - old_x.min()) / 30)[:, None],
                                                                 (28, 24)), atol=1e-5)
    assert native.to_original(prob) is prob  # not resampled: unchanged
    with pytest.raises(DataError, match="target_spacing=-1"):
        prepare_cache([s], tmp_path, target_spacing=-1.0, progress=False)


# ---- whole runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    """`main.py --preset=tiny --inplane=patch --img_size=32`: 64² unit-phantom slices, 32² crops;
    predict_volume (the resize path) is switched off, so every prediction must take the sliding
    window (validation, evaluation)."""
    import main

    base = tmp_path_factory.mktemp("patchrun")
    calls = {"sliding": 0}
    real_sliding = inference.predict_volume_sliding

    def no_resize(*args, **kwargs):
        raise AssertionError("predict_volume (resize path) called in a patch-mode run")

    def counted(*args, **kwargs):
        calls["sliding"] += 1
        return real_sliding(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "predict_volume", no_resize)
        mp.setattr(inference, "predict_volume_sliding", counted)
        outcome = main.main(["--preset=tiny", "--inplane=patch", "--img_size=32",
                             f"--out_dir={base / 'runs'}", "--run_name=patch",
                             f"--cache_dir={base / 'cache'}", "--save_overlays=False"])
    return base, Path(outcome["run_dir"]), outcome, calls


def test_patch_run_trains_validates_and_evaluates(patch_run):
    base, run_dir, outcome, calls = patch_run
    cfg = config.load_config(run_dir)
    assert cfg.inplane == "patch" and cfg.img_size == 32
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(r["val_pseudo_dice"] is not None for r in history)
    assert calls["sliding"] == 2 * 2 + 2  # 2 validations x 2 val studies + 2 test studies
    assert outcome["eval"]["settings"]["inplane"] == "patch" and outcome["eval"]["n_studies"] == 2
    rows = list(csv.DictReader(open(run_dir / "eval" / "per_case.csv")))
    for row in rows:
        cached = next(s for s in json.loads((run_dir / "cases.json").read_text())["studies"]
                      if s["case_id"] == row["case_id"])
        seg = nib.load(Path(cached["source"]) / "SEG.nii.gz")
        pred = nib.load(run_dir / "eval" / "predictions" / f"{row['case_id']}.nii.gz")
        assert pred.shape == seg.shape == (64, 64, 32)  # the original shape, not the 32² input
        np.testing.assert_allclose(pred.affine, seg.affine, atol=1e-5)


def test_onnx_check_slices_are_tiles_in_patch_mode(patch_run):
    _, run_dir, _, _ = patch_run
    cfg = config.load_config(run_dir)
    slices = evaluation._test_slices(run_dir, cfg, 8)  # <= 2 slices of each of the 2 test studies
    assert slices.shape[1:] == (2, 32, 32) and len(slices) >= 2
    studies = evaluation.run_studies(run_dir, cfg)
    cached = studies[0]
    z = (list(cached.fg_slices) + [cached.image().shape[0] // 2])[0]
    x0, y0 = evaluation._tile_start(np.asarray(cached.mask()[z]), 32)
    want = np.asarray(cached.image()[z], np.float32)[:, x0:x0 + 32, y0:y0 + 32]
    assert torch.equal(slices[0], torch.from_numpy(want))  # a tile at the cached resolution
    if cached.fg_slices:  # placed on the tumour
        assert np.asarray(cached.mask()[z])[x0:x0 + 32, y0:y0 + 32].any()




def test_target_spacing_run_is_scored_and_written_on_the_original_grid(tmp_path, monkeypatch):
    """A run whose cache resamples the 5 mm unit phantom to 7.5 mm (64² -> 43²): evaluation and
    prediction map the probabilities back, so masks have the SUV file's shape and affine, the
    metrics are those of the written mask against the study's own SEG, and the mask matches
    'SUV > 3' thresholded on the original PET nearly everywhere (no shift, flip or stretch)."""
    import models
    from data.phantom import generate
    from data.prepare import prepare_data
    from metrics import case_metrics

    generate(tmp_path / "phantom", 4, size="unit", seed=0, progress=False)
    cfg = config.make_config({"preset": "tiny", "inplane": "patch", "img_size": 32,
                              "target_spacing": 7.5, "cache_dir": str(tmp_path / "cache"),
                              "data_dir": str(tmp_path / "phantom"), "n_bootstrap": 10,
                              "save_overlays": False, "n_val": 1, "n_test": 1})
    manifest = prepare_data(data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, n_val=1, n_test=1,
                            target_spacing=7.5)
    assert all(s.resampled and s.shape[:2] == (43, 43) for s in manifest.studies)
    run_dir = tmp_path / "runs" / "r"
    split = write_toy_run(run_dir, cfg, manifest, PetThreshold())
    monkeypatch.setattr(models, "build_model", lambda name, **kw: PetThreshold(kw["in_channels"]))

    summary = evaluation.evaluate(run_dir, progress=False)
    rows = {r["case_id"]: r for r in csv.DictReader(open(Path(summary["output_dir"]) / "per_case.csv"))}
    written = evaluation.predict_dir(run_dir, tmp_path / "phantom", tmp_path / "masks", progress=False)
    assert len(written) == 4
    by_id = manifest.by_id()
    for case_id in split["test"]:
        source = Path(by_id[case_id].source)
        suv, seg = nib.load(source / "SUV.nii.gz"), nib.load(source / "SEG.nii.gz")
        for path in (Path(summary["output_dir"]) / "predictions" / f"{case_id}.nii.gz",
                     tmp_path / "masks" / f"{case_id}.nii.gz"):
            pred = nib.load(path)
            assert pred.shape == suv.shape == (64, 64, 32)
            np.testing.assert_allclose(pred.affine, suv.affine, atol=1e-5)
        pred = np.asarray(pred.dataobj) > 0
        direct = suv.get_fdata() > 3.0  # the toy model's rule on the original grid
        agreement = 2 * (pred & direct).sum() / (pred.sum() + direct.sum())
        assert agreement > 0.9, agreement
        ref = np.asarray(seg.dataobj) > 0
        hand = case_metrics(pred, ref, tuple(np.abs(np.diag(suv.affine)[:3])))
        assert rows[case_id]["mask_from"] == "original"
        assert float(rows[case_id]["fpv_ml"]) == pytest.approx(hand["fpv_ml"])
        if ref.any():
            assert float(rows[case_id]["dice"]) == pytest.approx(hand["dice"])
    assert summary["settings"]["target_spacing"] == 7.5
