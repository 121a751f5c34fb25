"""Tests of the synthetic PET/CT phantom (data/phantom.py) on the `unit` size.

The expensive acceptance properties (threshold / oracle Dice, distractor SUVmax, timing at
`demo` size) are measured by bench/bench_phantom.py; here: what is cheap on 64 x 64 x 32.
"""
import hashlib
import json
import os
import time

import nibabel as nib
import numpy as np
import pytest

from data import _anatomy as A
from data.organs import N_ORGAN_CLASSES, ORGAN_LABELS, ORGAN_TISSUES, organ_labels
from data.phantom import PHANTOM_VERSION, SIZES, generate, has_tumor, main, make_study, names, render
from data.study import DataError


def _hash(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_make_study_shapes_dtypes_and_speed():
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        ct, pet, seg, spacing, meta = make_study(i, "unit", seed=0)
        times.append(time.perf_counter() - t0)
        assert ct.shape == pet.shape == seg.shape == (64, 64, 32)
        assert (ct.dtype, pet.dtype, seg.dtype) == (np.float32, np.float32, np.uint8)
        assert spacing == SIZES["unit"]["spacing"]
        assert np.isfinite(ct).all() and np.isfinite(pet).all() and pet.min() >= 0
        assert set(np.unique(seg)) <= {0, 1}
        assert ct.min() >= -1024 and ct.max() < 3000
    # "well under 0.5 s per case"; generous bound for a shared, loaded 2-core machine
    assert np.median(times) < 1.5, times


def test_tumour_balance_is_exact_for_every_prefix():
    flags = [has_tumor(i, seed=3) for i in range(200)]
    for n in range(2, 201, 2):
        assert sum(flags[:n]) == n // 2
    assert flags != [has_tumor(i, seed=4) for i in range(200)]  # the seed matters


def test_fractions_and_lesion_metadata():
    studies = [render(i, "unit", seed=1) for i in range(10)]
    tumour = sum(int(r.seg.sum()) for r in studies)
    voxels = sum(r.seg.size for r in studies)
    assert 0 < tumour / voxels < 1e-3
    slices_with_tumour = sum(int(r.seg.any(axis=(0, 1)).sum()) for r in studies)
    assert 1 - slices_with_tumour / sum(r.seg.shape[2] for r in studies) >= 0.85
    for r in studies:
        m = r.meta
        assert m["has_tumor"] == bool(r.seg.any()) == bool(m["lesions"])
        assert 1 <= len(m["lesions"]) <= 6 or not m["has_tumor"]
        assert m["tumour_voxels"] == int(r.seg.sum())
        voxel_ml = np.prod(r.spacing) / 1000
        assert m["tumour_ml"] == pytest.approx(r.seg.sum() * voxel_ml, abs=1e-3)
        # lesion volumes add up to the label (>=: lesions may overlap)
        assert sum(l["volume_ml"] for l in m["lesions"]) >= m["tumour_ml"] - 1e-3
        for l in m["lesions"]:
            assert 6 <= l["diameter_mm"] <= 30 and l["volume_ml"] > 0
            assert l["low_contrast"] is False or l["site"].split(":")[0] in ("liver", "bone")
            assert 0 < l["recovered_suvmax"]
            x, y, z = l["centre_voxel"]
            assert r.tissue[x, y, z] == A.LESION or l["necrotic"] or r.seg[
                max(x - 1, 0):x + 2, max(y - 1, 0):y + 2, max(z - 1, 0):z + 2].any()
        # every labelled voxel is lesion tissue (no structure painted over a lesion)
        assert (r.tissue[r.seg > 0] == A.LESION).all()
        json.dumps(m)  # serialisable


def test_determinism_and_independence_of_other_cases():
    a = make_study(5, "unit", seed=7)
    b = make_study(5, "unit", seed=7)
    assert _hash(*a[:3]) == _hash(*b[:3]) and a[4] == b[4]
    c = make_study(5, "unit", seed=8)
    assert _hash(*a[:3]) != _hash(*c[:3])


def test_partial_volume_trend():
    """Recovered / true SUVmax grows with lesion size (docs/phantom.md, "Acceptance properties", 5)."""
    les = [l for i in range(60) if has_tumor(i, seed=2)
           for l in render(i, "unit", seed=2).meta["lesions"] if not l["low_contrast"]]
    small = [l["recovered_suvmax"] / l["true_suvmax"] for l in les if l["diameter_mm"] < 10]
    large = [l["recovered_suvmax"] / l["true_suvmax"] for l in les if l["diameter_mm"] >= 18]
    assert len(small) >= 5 and len(large) >= 5
    assert np.median(small) < 0.75 < np.median(large)


def test_second_studies_share_the_patient():
    n8, n9, n10 = names(8), names(9), names(10)
    assert n9["patient_id"] == n8["patient_id"] != n10["patient_id"]
    assert n9["case_id"] == n8["case_id"] + "_2"
    assert n9["study_folder"] != n8["study_folder"] and " " in n9["study_folder"]
    assert sorted([n9["study_folder"], n8["study_folder"]])[0] == n8["study_folder"]


def test_generate_writes_both_layouts_consistently(tmp_path):
    metas = generate(tmp_path, 3, size="unit", seed=0, layouts=("autopet", "nnunet"),
                     start_index=7, progress=False)
    assert [m["index"] for m in metas] == [7, 8, 9]
    assert metas[1]["patient_id"] == metas[2]["patient_id"]
    doc = json.loads((tmp_path / "phantom_metadata.json").read_text())
    assert doc["seed"] == 0 and doc["size"] == "unit" and len(doc["cases"]) == 3
    for m in metas:
        d = tmp_path / m["patient_id"] / m["study_folder"]
        imgs = {k: nib.load(d / f"{k}.nii.gz") for k in ("SUV", "CTres", "SEG")}
        for img in imgs.values():
            np.testing.assert_allclose(img.affine, imgs["SUV"].affine)
            assert img.header.get_zooms() == pytest.approx(SIZES["unit"]["spacing"])
            assert img.shape == tuple(m["shape"])
        assert np.asarray(imgs["SUV"].dataobj).dtype == np.float32
        assert np.asarray(imgs["CTres"].dataobj).dtype == np.float32
        seg = np.asarray(imgs["SEG"].dataobj)
        assert seg.dtype == np.uint8
        voxel_ml = np.prod(imgs["SEG"].header.get_zooms()) / 1000
        assert seg.sum() * voxel_ml == pytest.approx(m["tumour_ml"], abs=1e-3)
        # files hold exactly what make_study returns; recovered SUVmax from the file
        ct, pet, ref, _, _ = make_study(m["index"], "unit", seed=0)
        assert _hash(np.asarray(imgs["SUV"].dataobj), np.asarray(imgs["CTres"].dataobj), seg) \
            == _hash(pet, ct, ref)
        for l in m["lesions"]:
            x, y, z = l["centre_voxel"]
            assert l["recovered_suvmax"] <= pet.max() + 1e-3
        c = m["case_id"]
        for f in (f"imagesTr/{c}_0000.nii.gz", f"imagesTr/{c}_0001.nii.gz", f"labelsTr/{c}.nii.gz"):
            assert (tmp_path / f).is_file()
        nn_ct = np.asarray(nib.load(tmp_path / f"imagesTr/{c}_0000.nii.gz").dataobj)
        assert _hash(nn_ct) == _hash(ct)  # channel 0000 = CT
    assert not list(tmp_path.glob(".tmp-*"))


def test_generate_is_idempotent_prefix_stable_and_repairs(tmp_path):
    first = generate(tmp_path / "a", 1, size="unit", seed=0, progress=False)
    more = generate(tmp_path / "b", 3, size="unit", seed=0, progress=False)
    assert first[0] == more[0]
    study = tmp_path / "b" / more[1]["patient_id"] / more[1]["study_folder"]
    mtime = (study / "SUV.nii.gz").stat().st_mtime_ns
    os.remove(tmp_path / "b" / more[2]["patient_id"] / more[2]["study_folder"] / "SEG.nii.gz")
    (tmp_path / "b" / ".tmp-stale-1").mkdir()  # left by an interrupted run
    again = generate(tmp_path / "b", 3, size="unit", seed=0, progress=False)
    assert again == more
    assert (study / "SUV.nii.gz").stat().st_mtime_ns == mtime  # complete study skipped
    assert (tmp_path / "b" / more[2]["patient_id"] / more[2]["study_folder"] / "SEG.nii.gz").exists()
    assert not list((tmp_path / "b").glob(".tmp-*"))


def test_user_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="unknown phantom size"):
        make_study(0, "huge")
    with pytest.raises(DataError, match="layout"):
        generate(tmp_path, 1, size="unit", layouts=("png",), progress=False)
    generate(tmp_path, 1, size="unit", seed=0, progress=False)
    with pytest.raises(DataError, match="seed=1"):
        generate(tmp_path, 1, size="unit", seed=1, progress=False)
    assert main([f"--out_dir={tmp_path / 'x'}", "--size=nope"]) == 2
    assert "unknown phantom size" in capsys.readouterr().err
    assert main([f"--out_dir={tmp_path / 'y'}", "--n_cases=2", "--size=unit", "--workers=1",
                 "--layout=nnunet"]) == 0
    assert len(list((tmp_path / "y" / "labelsTr").glob("*.nii.gz"))) == 2


# ----------------------------------------------------------------------------- organ labels

# sha256 (first 16 hex digits) of CT, PET, SEG of `unit` studies (seed 0), computed on main at
# f3e6471, before the organ labels were added: adding ORGANS must not change a single voxel.
UNIT_HASHES = {
    0: ("78328b4698e14152", "39d0c24e808e6aae", "fa43239bcee7b97c"),
    1: ("b6db3d2225d2ab11", "2076a4cdc9bb2c48", "b1ceaa4fa5472a1d"),
    2: ("4d1a86381c115e65", "33266b97c1d8bdfe", "8755f73dfca70b66"),
    9: ("4d55bfb070194f75", "971a596e0a2caa64", "fa43239bcee7b97c"),
}


@pytest.mark.parametrize("index", sorted(UNIT_HASHES))
def test_ct_pet_seg_unchanged_by_organ_labels(index):
    r = render(index, "unit", seed=0)
    assert tuple(_hash(a)[:16] for a in (r.ct, r.pet, r.seg)) == UNIT_HASHES[index]


def test_organ_label_map_covers_the_tissues():
    assert N_ORGAN_CLASSES == len(ORGAN_LABELS) == max(ORGAN_LABELS) + 1 and ORGAN_LABELS[0] == "background"
    tissues = [t for ts in ORGAN_TISSUES.values() for t in ts]
    assert len(tissues) == len(set(tissues))  # every tissue in at most one organ
    assert set(range(A.LESION + 1)) - set(tissues) == {A.AIR, A.FAT, A.VISCERAL_FAT, A.CANAL, A.LESION}
    tissue = np.arange(A.LESION + 1, dtype=np.uint8)
    organs = organ_labels(tissue)
    assert organs[A.KIDNEY] == 3 and organs[A.BOLUS] == organs[A.URETER] == 5
    assert organs[A.MYOCARDIUM] == organs[A.BLOOD] == 2 and organs[A.LESION] == 0


def test_organ_labels_of_rendered_studies():
    for i in (1, 2, 4):
        r = render(i, "unit", seed=0)
        organs = r.organs
        assert organs.dtype == np.uint8 and organs.shape == r.seg.shape
        assert np.array_equal(organs, organ_labels(r.tissue))
        assert not (organs[r.seg > 0]).any()  # lesions are background: ORGANS and SEG disjoint
        present = set(np.unique(organs).tolist())
        assert present <= set(ORGAN_LABELS) and {1, 2, 3, 6, 7, 10, 11} <= present  # brain .. bone


def test_generate_writes_organs_in_both_layouts(tmp_path):
    metas = generate(tmp_path, 2, size="unit", seed=0, layouts=("autopet", "nnunet"), start_index=1,
                     progress=False)
    doc = json.loads((tmp_path / "phantom_metadata.json").read_text())
    assert doc["phantom_version"] == PHANTOM_VERSION == 2
    assert all(c["phantom_version"] == PHANTOM_VERSION for c in doc["cases"])
    for m in metas:
        r = render(m["index"], "unit", seed=0)
        d = tmp_path / m["patient_id"] / m["study_folder"]
        for path in (d / "ORGANS.nii.gz", tmp_path / "organsTr" / f"{m['case_id']}.nii.gz"):
            img = nib.load(path)
            data = np.asarray(img.dataobj)
            assert data.dtype == np.uint8 and np.array_equal(data, r.organs)
            np.testing.assert_allclose(img.affine, nib.load(d / "SEG.nii.gz").affine)
        seg_nn = np.asarray(nib.load(tmp_path / "labelsTr" / f"{m['case_id']}.nii.gz").dataobj)
        assert np.array_equal(seg_nn, r.seg)  # labelsTr and organsTr share a file name, not content


def test_study_without_organs_or_older_version_is_rewritten(tmp_path):
    metas = generate(tmp_path, 2, size="unit", seed=0, progress=False)
    dirs = [tmp_path / m["patient_id"] / m["study_folder"] for m in metas]
    os.remove(dirs[0] / "ORGANS.nii.gz")  # a folder written before the organ labels
    doc_path = tmp_path / "phantom_metadata.json"
    doc = json.loads(doc_path.read_text())
    doc["cases"][1]["phantom_version"] = 1
    doc_path.write_text(json.dumps(doc))
    (dirs[1] / "marker").write_text("the study folder is replaced as a whole when rewritten")
    again = generate(tmp_path, 2, size="unit", seed=0, progress=False)
    assert (dirs[0] / "ORGANS.nii.gz").is_file()
    assert not (dirs[1] / "marker").exists()  # older version: rewritten
    assert [m["phantom_version"] for m in again] == [PHANTOM_VERSION] * 2
