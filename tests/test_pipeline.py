"""Preprocessing cache, patient-level split and slice dataset, on tiny in-memory studies."""
import json
import sys
import types
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from data.cache import CachedStudy, cache_key, load_cached, prepare_cache
from data.dataset import PetCtSliceDataset, from_model_grid, to_model_grid, worker_init_fn
from data.split import load_split, save_split, split_cases
from data.study import DataError, Study, StudyRef


def make_study(case_id="P1_a", patient_id="P1", shape=(12, 10, 8), tumour=True, seed=0,
               labelled=True):
    rng = np.random.default_rng(seed)
    ct = rng.uniform(-1300, 1500, shape).astype(np.float32)
    pet = rng.uniform(0, 30, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    if tumour:
        mask[3:6, 2:5, 2:4] = 1  # tumour on slices z = 2, 3
    return Study(ct=ct, pet=pet, mask=mask if labelled else None, spacing=(2.0, 2.0, 3.0),
                 affine=np.diag([2.0, 2.0, 3.0, 1.0]), case_id=case_id, patient_id=patient_id,
                 source=f"memory:{case_id}")


# ---- cache --------------------------------------------------------------------------------

def test_cache_round_trip_matches_formula(tmp_path):
    study = make_study()
    (cached,) = prepare_cache([study], tmp_path, ct_window=(-1000.0, 1000.0), suv_max=20.0,
                              progress=False)
    image, mask = cached.image(), cached.mask()
    assert isinstance(cached, CachedStudy) and isinstance(image, np.memmap)
    assert image.dtype == np.float16 and image.shape == (8, 2, 12, 10)
    assert mask.dtype == np.uint8 and mask.shape == (8, 12, 10)
    ct_ref = 2 * (np.clip(study.ct, -1000, 1000) + 1000) / 2000 - 1  # (X, Y, Z)
    suv_ref = 2 * np.clip(study.pet, 0, 20) / 20 - 1
    # float16 has an 11-bit significand: relative error <= 2**-11 on values in [-1, 1]
    np.testing.assert_allclose(image[:, 0], ct_ref.transpose(2, 0, 1), atol=1e-3)
    np.testing.assert_allclose(image[:, 1], suv_ref.transpose(2, 0, 1), atol=1e-3)
    np.testing.assert_array_equal(mask, study.mask.transpose(2, 0, 1))
    assert cached.fg_slices == [2, 3] and cached.has_tumor and cached.has_mask
    assert cached.shape == (12, 10, 8) and cached.spacing == (2.0, 2.0, 3.0)
    assert np.allclose(cached.affine, study.affine)
    assert load_cached(cached.directory) == cached
    with pytest.raises(ValueError):  # read-only memory map
        image[0, 0, 0, 0] = 1
    # one slice (both channels) is one contiguous block of the file
    assert image[3].flags.c_contiguous and image.strides[0] == 2 * 12 * 10 * 2


def test_cache_unlabelled_and_tumour_free(tmp_path):
    studies = [make_study("P1_a", labelled=False), make_study("P2_a", "P2", tumour=False)]
    a, b = prepare_cache(studies, tmp_path, progress=False)
    assert not a.has_mask and not a.has_tumor and a.fg_slices == [] and not a.mask().any()
    assert b.has_mask and not b.has_tumor and b.fg_slices == []


def test_cache_skips_existing_and_writes_atomically(tmp_path, monkeypatch):
    study = make_study()
    (first,) = prepare_cache([study], tmp_path, progress=False)
    root = tmp_path / cache_key((-1000, 1000), 20)
    folder = Path(first.directory)
    stamp = (folder / "image.npy").stat().st_mtime_ns
    assert folder.parent == root and folder.name.startswith("P1_a-")  # <case_id>-<source>

    import data.cache as cache_mod
    calls = []
    real_write = cache_mod._write_study
    monkeypatch.setattr(cache_mod, "_write_study", lambda *a: calls.append(1) or real_write(*a))
    (again,) = prepare_cache([study], tmp_path, progress=False)
    assert again == first and not calls
    assert (folder / "image.npy").stat().st_mtime_ns == stamp

    # a failure half-way through writing leaves neither a half study nor a temporary folder
    def broken(study, out, *args):
        (out / "image.npy").write_bytes(b"half")
        raise RuntimeError("killed")
    monkeypatch.setattr(cache_mod, "_write_study", broken)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_cache([make_study("P2_a", "P2")], tmp_path, progress=False)
    assert sorted(p.name for p in root.iterdir()) == [folder.name, "params.json"]

    # other parameters -> another key folder, the first one untouched
    monkeypatch.setattr(cache_mod, "_write_study", real_write)
    (other,) = prepare_cache([study], tmp_path, suv_max=10.0, progress=False)
    assert other.directory != first.directory
    expected = 2 * min(study.pet[0, 0, 0], 10) / 10 - 1
    assert np.isclose(float(other.image()[0, 1, 0, 0]), expected, atol=2e-3)


def test_changed_in_memory_study_gets_its_own_folder(tmp_path):
    study = make_study()
    (old,) = prepare_cache([study], tmp_path, progress=False)
    old_bytes = (Path(old.directory) / "image.npy").read_bytes()
    study.pet = np.full_like(study.pet, 5.0)
    (cached,) = prepare_cache([study], tmp_path, progress=False)
    np.testing.assert_allclose(cached.image()[:, 1], 2 * 5.0 / 20 - 1, atol=1e-3)
    # another source: another folder; the copy an earlier run used is kept, byte for byte
    assert cached.directory != old.directory and cached.content_hash != old.content_hash
    assert (Path(old.directory) / "image.npy").read_bytes() == old_bytes


def test_same_case_id_from_two_sources_never_shares_a_folder(tmp_path):
    """The phantom's case ids depend on its seed, not its size: a `unit` and a `demo` phantom
    (or a folder of new studies with generic names) reuse ids. Each source keeps its own copy."""
    a, b = make_study("case_1"), make_study("case_1")
    b.pet = b.pet + 1.0
    (ca,) = prepare_cache([a], tmp_path, progress=False)
    (cb,) = prepare_cache([b], tmp_path, progress=False)
    assert ca.directory != cb.directory and ca.content_hash != cb.content_hash
    assert load_cached(ca.directory) == ca  # untouched by the second source
    np.testing.assert_allclose(ca.image()[:, 1], (2 * np.clip(a.pet, 0, 20) / 20 - 1)
                               .transpose(2, 0, 1), atol=1e-3)


def test_every_bad_study_is_reported_at_once(tmp_path):
    bad_grid, bad_nan, good = make_study("P1_a"), make_study("P2_a", "P2"), make_study("P3_a", "P3")
    bad_grid.ct = bad_grid.ct[:, :, :5]
    bad_nan.pet[0, 0, 7] = np.nan
    with pytest.raises(DataError) as err:
        prepare_cache([bad_grid, good, bad_nan], tmp_path, progress=False)
    message = str(err.value)
    assert "2 of 3 studies" in message and "P1_a" in message and "P2_a" in message
    assert "one grid" in message and "NaN" in message and "P3_a:" not in message
    (cached,) = prepare_cache([good], tmp_path, progress=False)  # the good one was kept
    assert cached.case_id == "P3_a"


def test_refs_are_loaded_via_io_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    # data.io is a teammate's module: stand in for load_study with a reader of a .npy file
    src = tmp_path / "src" / "P1" / "study"
    src.mkdir(parents=True)
    np.save(src / "pet.npy", np.full((12, 10, 8), 4.0, np.float32))
    loads = []

    def load_study(ref, resample=False):
        loads.append(ref.case_id)
        study = make_study(ref.case_id, ref.patient_id)
        study.pet = np.load(ref.paths["pet"])
        return study
    monkeypatch.setitem(sys.modules, "data.io", types.SimpleNamespace(load_study=load_study))
    ref = StudyRef("P1_study", "P1", "autopet", {"pet": str(src / "pet.npy"), "dicom": str(src)})
    cache = tmp_path / "cache"
    (first,) = prepare_cache([ref], cache, progress=False)
    (second,) = prepare_cache([ref], cache, progress=False)
    assert loads == ["P1_study"] and first == second  # unchanged source: not even read
    np.testing.assert_allclose(second.image()[:, 1], 2 * 4.0 / 20 - 1, atol=1e-3)

    np.save(src / "pet.npy", np.full((12, 10, 8), 8.0, np.float32))  # size+mtime change
    (third,) = prepare_cache([ref], cache, progress=False)
    assert loads == ["P1_study", "P1_study"]
    np.testing.assert_allclose(third.image()[:, 1], 2 * 8.0 / 20 - 1, atol=1e-3)
    meta = json.loads(open(f"{third.directory}/meta.json").read())
    assert meta["fingerprint"]["kind"] == "files" and len(meta["fingerprint"]["files"]) == 2


def test_cache_from_autopet_nifti_files(tmp_path):
    # the real readers (data.io) on an autoPET-layout study written here; SEG rewritten -> rebuilt
    nib = pytest.importorskip("nibabel")
    from data.io import find_studies
    study = make_study(shape=(12, 10, 8))
    folder = tmp_path / "data" / "PETCT_0af7ffe12a" / "06-24-2006-NA-PET-CT Ganzkoerper"
    folder.mkdir(parents=True)
    for name, arr in (("SUV", study.pet), ("CTres", study.ct), ("SEG", study.mask)):
        nib.save(nib.Nifti1Image(arr, study.affine), folder / f"{name}.nii.gz")
    refs = find_studies(tmp_path / "data")
    (cached,) = prepare_cache(refs, tmp_path / "cache", progress=False)
    assert cached.case_id == "PETCT_0af7ffe12a" and cached.fg_slices == [2, 3]
    np.testing.assert_allclose(cached.image()[:, 1], (np.clip(study.pet, 0, 20) / 10 - 1)
                               .transpose(2, 0, 1), atol=1e-3)
    seg = np.zeros_like(study.mask)
    seg[0, 0, 6] = 1
    nib.save(nib.Nifti1Image(seg, study.affine), folder / "SEG.nii.gz")
    (rebuilt,) = prepare_cache(find_studies(tmp_path / "data"), tmp_path / "cache", progress=False)
    assert rebuilt.fg_slices == [6] and rebuilt.directory != cached.directory
    assert load_cached(cached.directory).fg_slices == [2, 3]  # the earlier copy is kept


def test_cache_errors(tmp_path):
    bad = make_study()
    bad.ct = bad.ct[:, :, :5]
    with pytest.raises(DataError, match="one grid"):
        prepare_cache([bad], tmp_path, progress=False)
    nan = make_study("P2_a", "P2")
    nan.pet[0, 0, 7] = np.nan
    with pytest.raises(DataError, match="NaN"):
        prepare_cache([nan], tmp_path, progress=False)
    with pytest.raises(DataError, match="case_id"):
        prepare_cache([make_study(), make_study()], tmp_path, progress=False)
    with pytest.raises(DataError, match="ct_window"):
        prepare_cache([make_study()], tmp_path, ct_window=(100, -100), progress=False)
    root = tmp_path / cache_key((-1000, 1000), 20)
    assert not (root / "P2_a").exists() and not any(p.name.startswith(".") for p in root.iterdir())
    with pytest.raises(DataError, match="meta.json"):
        load_cached(tmp_path / "nowhere")


# ---- split --------------------------------------------------------------------------------

Case = namedtuple("Case", "case_id patient_id has_tumor")


def cohort(n_patients=40, seed=1):
    """Patients P00.. with 1 or 2 studies; 40 % of the patients have tumour in some study."""
    rng = np.random.default_rng(seed)
    cases = []
    for p in range(n_patients):
        tumour = p % 5 < 2
        for s in range(1 + (rng.random() < 0.3)):
            cases.append(Case(f"P{p:02d}_{s}", f"P{p:02d}", tumour and s == 0))
    return cases


def patients_of(cases, ids):
    pid = {c.case_id: c.patient_id for c in cases}
    return {pid[i] for i in ids}


def test_split_is_patient_level_complete_and_stratified():
    cases = cohort()
    split = split_cases(cases, n_val=5, n_test=10, seed=0)
    sets = [patients_of(cases, split[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(sum(split.values(), [])) == sorted(c.case_id for c in cases)
    assert len(split["test"]) >= 10 and len(split["val"]) >= 5
    tumour_patients = {c.patient_id for c in cases if c.has_tumor}
    n_test = len(sets[2])
    assert abs(len(sets[2] & tumour_patients) - 0.4 * n_test) <= 1  # cohort share 16/40


def test_split_is_deterministic_and_order_independent():
    cases = cohort()
    a = split_cases(cases, n_val=5, n_test=10, seed=3)
    shuffled = [cases[i] for i in np.random.default_rng(0).permutation(len(cases))]
    assert split_cases(shuffled, n_val=5, n_test=10, seed=3) == a
    assert split_cases(cases, n_val=5, n_test=10, seed=4) != a


def test_kfold_covers_every_patient_once():
    cases = cohort(n_patients=23)
    tumour_patients = {c.patient_id for c in cases if c.has_tumor}
    seen = []
    for fold in range(5):
        split = split_cases(cases, n_val=3, n_test=0, seed=0, n_folds=5, fold=fold)
        test = patients_of(cases, split["test"])
        assert not test & patients_of(cases, split["train"] + split["val"])
        assert abs(len(test & tumour_patients) - len(test) * len(tumour_patients) / 23) <= 1
        seen += sorted(test)
    assert sorted(seen) == sorted({c.patient_id for c in cases})


def test_split_errors_and_save_load(tmp_path):
    cases = cohort(n_patients=10)
    with pytest.raises(DataError, match="no training"):
        split_cases(cases, n_val=5, n_test=10)
    with pytest.raises(DataError, match="fold"):
        split_cases(cases, n_val=1, n_test=0, n_folds=5, fold=5)
    with pytest.raises(DataError, match="n_folds"):
        split_cases(cases, n_val=1, n_test=1, n_folds=1)
    split = split_cases(cases, n_val=2, n_test=2)
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == split
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "missing.json")


# ---- slice dataset ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """4 studies of 16 x 16 x 20; two have tumour on 2 slices each (natural share 4/80)."""
    studies = [make_study(f"P{k}_a", f"P{k}", shape=(16, 16, 20), tumour=k < 2, seed=k)
               for k in range(4)]
    return prepare_cache(studies, tmp_path_factory.mktemp("cache"), progress=False)


@pytest.mark.parametrize("fg_fraction", [0.0, 0.33, 1.0])
def test_oversampling_share(cached, fg_fraction):
    ds = PetCtSliceDataset(cached, img_size=16, fg_fraction=fg_fraction, augment=False,
                           samples_per_epoch=2000, seed=0)
    share = np.mean([ds[i][1].any().item() for i in range(len(ds))])
    expected = fg_fraction + (1 - fg_fraction) * 4 / 80
    assert abs(share - expected) < 0.04  # binomial sd <= 0.011 at n = 2000


def test_lesion_sampling_draws_every_lesion_equally(tmp_path):
    # one study, two lesions: a large one over slices 2-9 (8 slices), a small one on slice 15;
    # slice sampling draws the small one's slice 1 time in 9, lesion sampling 1 time in 2
    study = make_study(shape=(16, 16, 20), tumour=False)
    study.mask[2:8, 2:8, 2:10] = 1
    study.mask[12, 12, 15] = 1
    (cs,) = prepare_cache([study], tmp_path, progress=False)
    from data.dataset import lesion_extents
    np.testing.assert_array_equal(lesion_extents([cs]), [[0, 2, 9], [0, 15, 15]])
    share = {}
    for mode in ("slice", "lesion"):
        ds = PetCtSliceDataset([cs], img_size=16, fg_fraction=1.0, augment=False,
                               samples_per_epoch=3000, seed=0, fg_sampling=mode)
        z = np.array([ds.locate(i)[1] for i in range(len(ds))])
        assert set(z) <= set(range(2, 10)) | {15}  # always a tumour slice
        share[mode] = np.mean(z == 15)
        if mode == "lesion":
            large = np.bincount(z[z < 15], minlength=10)[2:10] / np.sum(z < 15)
            assert np.abs(large - 1 / 8).max() < 0.03  # uniform over the large lesion's slices
    assert abs(share["slice"] - 1 / 9) < 0.02 and abs(share["lesion"] - 1 / 2) < 0.03
    with pytest.raises(DataError, match="fg_sampling"):
        PetCtSliceDataset([cs], img_size=16, samples_per_epoch=4, fg_sampling="voxel")


def hot_study(shape=(40, 24, 20)):
    """PET at SUV 1 everywhere, tumour (SUV 10) on slices 2-3, physiological uptake (SUV 8, no
    tumour) at one voxel of slices 5 and 6, SUV 2.9 (below the 3.0 threshold) on slice 9."""
    study = make_study(shape=shape, tumour=False)
    study.pet[:] = 1.0
    study.mask[3:6, 2:5, 2:4] = 1
    study.pet[3:6, 2:5, 2:4] = 10.0
    study.pet[30, 4, 5] = study.pet[7, 20, 6] = 8.0
    study.pet[10, 10, 9] = 2.9
    return study


def test_hot_slices_and_their_share(tmp_path):
    from data.dataset import hot_slices
    (cs,) = prepare_cache([hot_study()], tmp_path, progress=False)
    np.testing.assert_array_equal(hot_slices([cs], cs.suv_max, 3.0), [[0, 5], [0, 6]])
    np.testing.assert_array_equal(hot_slices([cs], cs.suv_max, 0.5), [[0, z] for z in range(20) if z not in (2, 3)])
    ds = PetCtSliceDataset([cs], img_size=16, fg_fraction=0.25, hot_fraction=0.5, augment=False,
                           samples_per_epoch=4000, seed=0)
    z = np.array([ds.locate(i)[1] for i in range(len(ds))])
    # tumour 0.25 + uniform 0.25 * 2/20; hot 0.5 + uniform 0.25 * 2/20; the rest uniform
    assert abs(np.isin(z, (2, 3)).mean() - 0.275) < 0.03  # binomial sd ~0.007
    assert abs(np.isin(z, (5, 6)).mean() - 0.525) < 0.03
    assert abs((z == 5).mean() - (z == 6).mean()) < 0.04  # uniform over the hot slices
    assert abs(np.isin(z, (0, 1, 4, 7, 8, 9)).mean() - 0.25 * 6 / 20) < 0.02


def test_hot_fraction_zero_keeps_the_draws(cached):
    # the picks of the code before hot_fraction existed (fg_fraction 0.33, seed 0, epoch 1)
    ds = PetCtSliceDataset(cached, img_size=16, fg_fraction=0.33, augment=False,
                           samples_per_epoch=24, seed=0)
    ds.set_epoch(1)
    assert [tuple(ds.locate(i)[:2]) for i in range(24)] == [
        (3, 19), (3, 5), (1, 3), (3, 0), (0, 2), (1, 4), (0, 2), (2, 6), (0, 16), (3, 13),
        (0, 3), (3, 19), (1, 2), (1, 2), (2, 15), (0, 3), (1, 7), (0, 11), (0, 2), (1, 2),
        (3, 18), (3, 1), (2, 0), (3, 5)]


def test_hot_patch_crop_holds_the_uptake(tmp_path):
    (cs,) = prepare_cache([hot_study()], tmp_path, progress=False)
    ds = PetCtSliceDataset([cs], img_size=16, fg_fraction=0.0, hot_fraction=1.0, augment=False,
                           samples_per_epoch=60, seed=0, inplane="patch")
    for i in range(len(ds)):
        k, z, (x0, y0) = ds.locate(i)
        assert z in (5, 6)
        x, y = (30, 4) if z == 5 else (7, 20)
        assert x0 <= x < x0 + 16 and y0 <= y < y0 + 16  # the hot voxel lies in the crop
        image, _ = ds[i]
        assert image[1].max().item() == pytest.approx(-0.2, abs=0.01)  # SUV 8: 2 * 8 / 20 - 1


def test_hot_fraction_errors(tmp_path):
    study = hot_study()
    study.pet[30, 4, 5] = study.pet[7, 20, 6] = 1.0  # no uptake left outside the tumour
    (cs,) = prepare_cache([study], tmp_path, progress=False)
    with pytest.raises(DataError, match="no tumour-free slice .* uptake_suv=3.0"):
        PetCtSliceDataset([cs], img_size=16, hot_fraction=0.3, samples_per_epoch=4)
    with pytest.raises(DataError, match="hot_fraction=0.8 must be within"):
        PetCtSliceDataset([cs], img_size=16, fg_fraction=0.33, hot_fraction=0.8, samples_per_epoch=4)
    import config
    with pytest.raises(config.ConfigError, match="--hot_fraction=0.8 with --fg_fraction=0.33"):
        config.parse_cli(["--hot_fraction=0.8"])
    assert config.parse_cli(["--hot_fraction=0.67"]).hot_fraction == 0.67  # 0.33 + 0.67 = 1


def test_items_depend_on_seed_epoch_index_only(cached):
    make = lambda: PetCtSliceDataset(cached, img_size=32, samples_per_epoch=12, seed=7)
    a, b = make(), make()
    for i in (0, 5, 11):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    epoch0 = [a[i][0] for i in range(12)]
    a.set_epoch(1)
    assert a.epoch == 1 and sum(torch.equal(x, a[i][0]) for i, x in enumerate(epoch0)) <= 2

    # the same batches with 0 or 2 (persistent) workers, also after set_epoch
    def batches(ds, workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers,
                                             worker_init_fn=worker_init_fn,
                                             persistent_workers=workers > 0)
        out = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            out += [x for x, _ in loader]
        return out
    for x, y in zip(batches(make(), 0), batches(make(), 2)):
        assert torch.equal(x, y)


def test_context_channels_and_clamping(tmp_path):
    study = make_study(shape=(8, 8, 5))
    study.ct = np.broadcast_to(np.arange(5, dtype=np.float32) * 100, (8, 8, 5)).copy()  # z * 100 HU
    (cs,) = prepare_cache([study], tmp_path, progress=False)
    ds = PetCtSliceDataset([cs], img_size=8, context_slices=2, augment=False,
                           samples_per_epoch=40, seed=0)
    assert ds.in_channels == 10
    seen = set()
    for i in range(40):
        image, mask = ds[i]
        assert image.shape == (10, 8, 8) and mask.shape == (1, 8, 8)
        _, z = ds.pick(np.random.default_rng([0, 0, i]))
        seen.add(z)
        for j, zz in enumerate(np.clip(np.arange(z - 2, z + 3), 0, 4)):
            assert torch.allclose(image[2 * j], torch.tensor(float(zz) * 0.1), atol=1e-3)
        np.testing.assert_array_equal(mask[0].numpy(), study.mask[:, :, z])
    assert {0, 4} <= seen  # both ends exercised


def test_augment_keeps_mask_binary_and_aligned(tmp_path):
    shape = (24, 20, 6)  # non-square slices, resampled to 32 x 32
    pet = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    pet[5:12, 4:9, :], mask[5:12, 4:9, :] = 15.0, 1  # off-centre bright square = tumour
    study = Study(ct=np.zeros(shape, np.float32), pet=pet, mask=mask, spacing=(2, 2, 3),
                  affine=np.eye(4), case_id="P1_a", patient_id="P1", source="memory")
    (cs,) = prepare_cache([study], tmp_path, progress=False)
    ds = PetCtSliceDataset([cs], img_size=32, fg_fraction=1.0, augment=True,
                           samples_per_epoch=60, seed=0)
    centroids = set()
    for i in range(len(ds)):
        image, m = ds[i]
        assert image.shape == (2, 32, 32) and image.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
        bright = image[1] > 0.0  # SUV > 10 after jitter: the square
        iou = (bright & (m[0] > 0)).sum() / (bright | (m[0] > 0)).sum()
        assert iou > 0.75, (i, iou)
        ys, xs = np.nonzero(m[0].numpy())
        centroids.add((round(ys.mean() / 4), round(xs.mean() / 4)))
        assert image.min() >= -1 and image.max() <= 1
    assert len(centroids) >= 4  # flips / rot90 actually move the square


def test_model_grid_round_trip():
    mask = (torch.rand(2, 1, 24, 20) > 0.7).float()
    up = to_model_grid(mask, 32, mode="nearest")
    assert up.shape == (2, 1, 32, 32) and set(up.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(from_model_grid(up, (24, 20), mode="nearest"), mask)
    xs = torch.linspace(-1, 1, 24)[:, None], torch.linspace(-1, 1, 20)[None, :]
    smooth = torch.exp(-(xs[0] ** 2 + xs[1] ** 2) * 2)[None, None]  # (1, 1, 24, 20)
    back = from_model_grid(to_model_grid(smooth, 64), (24, 20))
    assert back.shape == smooth.shape and (back - smooth).abs().max() < 0.02
    same = torch.rand(1, 3, 16, 16)
    assert to_model_grid(same, 16) is same and from_model_grid(same, (16, 16)) is same
