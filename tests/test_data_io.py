"""Readers and validation of data/io.py and data/check.py on tiny files written here."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import TINY_AFFINE, TINY_SHAPE, TINY_STUDIES, make_tiny_study, write_autopet_study
from data import DataError, Study, StudyRef, find_studies, load_study
from data.check import check_dataset, main as check_main
from data.geometry import resample_to_grid
from data.io import write_png_study

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "data"))


# ----------------------------------------------------------------------------- autoPET layout

def test_autopet_find_and_load(tiny_autopet_dir):
    before = _snapshot(tiny_autopet_dir)
    refs = find_studies(tiny_autopet_dir)
    assert [r.case_id for r in refs] == ["PETCT_p01", "PETCT_p02", "PETCT_p03", "PETCT_p03_2", "PETCT_p04", "PETCT_p05"]
    assert [r.patient_id for r in refs] == ["PETCT_p01", "PETCT_p02", "PETCT_p03", "PETCT_p03",
                                            "PETCT_p04", "PETCT_p05"]
    assert all(r.layout == "autopet" and set(r.paths) == {"ct", "pet", "mask"} for r in refs)
    assert refs == find_studies(tiny_autopet_dir, layout="autopet")  # deterministic, auto == explicit
    studies = [load_study(r) for r in refs]
    for s, (_, _, has_tumor) in zip(studies, TINY_STUDIES):
        assert isinstance(s, Study) and s.ct.shape == s.pet.shape == s.mask.shape == TINY_SHAPE
        assert s.ct.dtype == s.pet.dtype == np.float32 and s.mask.dtype == np.uint8
        assert s.spacing == (2.0, 2.0, 3.0) and np.array_equal(s.affine, TINY_AFFINE)
        assert s.has_tumor == has_tumor and set(np.unique(s.mask)) <= {0, 1}
    ct, pet, mask = make_tiny_study(seed=0, has_tumor=True)
    assert np.array_equal(studies[0].ct, ct) and np.array_equal(studies[0].pet, pet)
    assert np.array_equal(studies[0].mask, mask)
    # a study folder (name with spaces) can be loaded directly
    one = load_study(tiny_autopet_dir / TINY_STUDIES[0][0] / TINY_STUDIES[0][1])
    assert one.case_id == "PETCT_p01" and np.array_equal(one.pet, pet)
    assert _snapshot(tiny_autopet_dir) == before  # nothing written under the data folder


def test_autopet_missing_mask(tiny_autopet_dir, tmp_path):
    root = _copy(tiny_autopet_dir, tmp_path)
    seg = next(root.rglob("SEG.nii.gz"))
    seg.unlink()
    with pytest.raises(DataError, match="SEG.nii.gz") as err:
        find_studies(root)
    assert "require_mask=False" in str(err.value)
    refs = find_studies(root, require_mask=False)
    assert len(refs) == 6 and sum("mask" not in r.paths for r in refs) == 1
    assert load_study(next(r for r in refs if "mask" not in r.paths)).mask is None


# ----------------------------------------------------------------------------- nnU-Net layout

def _write_nnunet(root: Path, cases: dict[str, int], ct_channel=0, pet_channel=1, channel_names=None):
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for case, seed in cases.items():
        ct, pet, mask = make_tiny_study(seed, has_tumor=seed % 2 == 0)
        nib.save(nib.Nifti1Image(ct, TINY_AFFINE), root / "imagesTr" / f"{case}_{ct_channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(pet, TINY_AFFINE), root / "imagesTr" / f"{case}_{pet_channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(mask, TINY_AFFINE), root / "labelsTr" / f"{case}.nii.gz")
    if channel_names is not None:
        (root / "dataset.json").write_text(json.dumps({"channel_names": channel_names, "file_ending": ".nii.gz"}))
    return root


def test_nnunet_channels_and_patient_ids(tmp_path):
    cases = {"PETCT_ab12": 0, "PETCT_ab12_2": 1, "case_1": 2, "case_2": 3,
             "fdg_0a1b2c_05-02-2002-NA-PET-CT Ganzkoerper": 4}
    root = _write_nnunet(tmp_path / "Dataset221", cases, channel_names={"0": "CT", "1": "CT"})  # autoPET III json
    refs = {r.case_id: r for r in find_studies(root)}
    assert {r.layout for r in refs.values()} == {"nnunet"}
    assert refs["PETCT_ab12_2"].patient_id == refs["PETCT_ab12"].patient_id == "PETCT_ab12"
    assert refs["case_1"].patient_id == "case_1" and refs["case_2"].patient_id == "case_2"  # no "case" base case
    fdg = refs["fdg_0a1b2c_05-02-2002-NA-PET-CT_Ganzkoerper"]  # file-name safe
    assert fdg.patient_id == "fdg_0a1b2c"
    s = load_study(refs["case_1"])
    ct, pet, mask = make_tiny_study(2, has_tumor=True)
    assert np.array_equal(s.ct, ct) and np.array_equal(s.pet, pet) and np.array_equal(s.mask, mask)


def test_nnunet_explicit_channel_order(tmp_path):
    root = _write_nnunet(tmp_path / "ds", {"c01": 0}, ct_channel=1, pet_channel=0)  # autoPET I order
    s = load_study(find_studies(root, ct_channel=1, pet_channel=0)[0])
    ct, pet, _ = make_tiny_study(0, has_tumor=True)
    assert np.array_equal(s.ct, ct) and np.array_equal(s.pet, pet)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "PET", "1": "CT"}}))
    with pytest.raises(DataError, match="dataset.json.*contradict.*--ct_channel"):
        find_studies(root)  # default order CT = 0 contradicts the json
    assert len(find_studies(root, ct_channel=1, pet_channel=0)) == 1
    os.remove(root / "imagesTr" / "c01_0001.nii.gz")
    with pytest.raises(DataError, match="c01_0001.nii.gz"):
        find_studies(root, ct_channel=1, pet_channel=0)


# ----------------------------------------------------------------------------- PNG layout

def test_png_roundtrip(tiny_autopet_dir, tmp_path):
    study = load_study(find_studies(tiny_autopet_dir)[0])
    case_dir = write_png_study(study, tmp_path / "png" / "PETCT_p01")
    assert sorted(p.name for p in (case_dir / "ct").iterdir())[:3] == ["0.png", "1.png", "10.png"]
    refs = find_studies(tmp_path / "png")
    assert len(refs) == 1 and refs[0].layout == "png" and refs[0].case_id == "PETCT_p01"
    back = load_study(refs[0])
    assert back.spacing == study.spacing and back.ct.shape == study.ct.shape
    np.testing.assert_allclose(back.ct, np.clip(np.rint(study.ct + 1024), 0, None) - 1024, atol=1e-3)
    np.testing.assert_allclose(back.pet, study.pet, atol=0.0005 + 1e-6)  # 0.001 SUV steps, numeric order by index
    assert np.array_equal(back.mask, study.mask)  # stored 0/255, read back 0/1
    (case_dir / "pet" / "5.png").unlink()
    with pytest.raises(DataError, match=r"missing \[5\]"):
        load_study(refs[0])


# ----------------------------------------------------------------------------- resampling

def test_resample_to_grid_linear_exact():
    """Trilinear sampling reproduces a linear function of world position exactly inside the image."""
    src_affine = np.diag([1.0, 1.0, 1.5, 1.0])
    src_affine[:3, 3] = [10.0, -5.0, 2.0]
    i, j, k = np.meshgrid(*(np.arange(n) for n in (20, 20, 10)), indexing="ij")
    world = [src_affine[a, 0] * i + src_affine[a, 1] * j + src_affine[a, 2] * k + src_affine[a, 3] for a in range(3)]
    src = (3 * world[0] - 2 * world[1] + 5 * world[2]).astype(np.float32)
    dst_affine = np.diag([2.0, 2.0, 3.0, 1.0])
    dst_affine[:3, 3] = [10.5, -4.5, 2.75]
    out = resample_to_grid(src, src_affine, dst_affine, (12, 12, 6), order=1, cval=-1000)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in (12, 12, 6)), indexing="ij")
    expect = 3 * (2 * ii + 10.5) - 2 * (2 * jj - 4.5) + 5 * (3 * kk + 2.75)
    inside = (2 * ii + 0.5 <= 19) & (2 * jj + 0.5 <= 19) & (3 * kk + 0.75 <= 13.5)
    np.testing.assert_allclose(out[inside], expect[inside], rtol=1e-5, atol=1e-3)
    assert (out[:, :, 5] == -1000).all()  # z = 17.75 mm lies beyond the source's last half voxel (16.25 mm)


def test_ct_on_other_grid_needs_resample(tmp_path):
    ct, pet, mask = make_tiny_study(0, has_tumor=True)
    fine_ct = np.repeat(ct, 2, axis=0)  # (64, 32, 12) at 1 mm along X covering the same extent
    fine_affine = TINY_AFFINE.copy()
    fine_affine[0, 0], fine_affine[0, 3] = -1.0, TINY_AFFINE[0, 3] + 0.5
    d = write_autopet_study(tmp_path / "P1" / "s 1", ct, pet, mask)
    nib.save(nib.Nifti1Image(fine_ct, fine_affine), d / "CTres.nii.gz")
    with pytest.raises(DataError) as err:
        load_study(d)
    msg = str(err.value)
    assert "(64, 32, 12) vs (32, 32, 12)" in msg and "CTres.nii.gz" in msg and "--resample=True" in msg
    s = load_study(d, resample=True)
    assert s.ct.shape == TINY_SHAPE and np.array_equal(s.affine, TINY_AFFINE)
    np.testing.assert_allclose(s.ct[1:-1], ct[1:-1], atol=1e-3)  # piecewise-constant pairs -> the same voxel value


def test_flipped_mask_is_reoriented_exactly(tmp_path):
    ct, pet, mask = make_tiny_study(0, has_tumor=True)
    d = write_autopet_study(tmp_path / "P1" / "s1", ct, pet, mask)
    flipped_affine = TINY_AFFINE @ np.array([[-1, 0, 0, TINY_SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(mask[::-1].copy(), flipped_affine), d / "SEG.nii.gz")
    assert np.array_equal(load_study(d).mask, mask)


# ----------------------------------------------------------------------------- validation messages

def test_non_binary_mask_names_file_and_values(tmp_path):
    ct, pet, mask = make_tiny_study(0, has_tumor=True)
    d = write_autopet_study(tmp_path / "P1" / "s1", ct, pet, mask * 2)
    with pytest.raises(DataError, match=r"SEG.nii.gz: the mask of study P1 is not binary: values \[0.0, 2.0\]"):
        load_study(d)
    write_autopet_study(d, ct, pet, mask * 255)  # 0/255 is refused too: strict on purpose
    with pytest.raises(DataError, match=r"not binary.*255"):
        load_study(d)


def test_nan_shape_affine_and_corrupt_file_messages(tmp_path):
    ct, pet, mask = make_tiny_study(0, has_tumor=True)
    d = write_autopet_study(tmp_path / "P1" / "s1", ct, pet, mask)
    bad_pet = pet.copy()
    bad_pet[1, 2, 3], bad_pet[0, 0, 0] = np.nan, np.inf
    nib.save(nib.Nifti1Image(bad_pet, TINY_AFFINE), d / "SUV.nii.gz")
    with pytest.raises(DataError, match=r"SUV.nii.gz: 2 NaN/inf voxels in the PET of study P1"):
        load_study(d)
    write_autopet_study(d, ct, pet, mask)
    nib.save(nib.Nifti1Image(mask[:, :, :10], TINY_AFFINE), d / "SEG.nii.gz")
    with pytest.raises(DataError, match=r"mask and PET shapes differ: \(32, 32, 10\) vs \(32, 32, 12\)"):
        load_study(d)
    shifted = TINY_AFFINE.copy()
    shifted[2, 3] += 0.01  # 10 micrometres beyond the tolerance
    nib.save(nib.Nifti1Image(ct, shifted), d / "CTres.nii.gz")
    nib.save(nib.Nifti1Image(mask, TINY_AFFINE), d / "SEG.nii.gz")
    with pytest.raises(DataError, match=r"CT and PET grids differ.*0.01\d* mm.*CTres.nii.gz"):
        load_study(d)
    assert np.abs(load_study(d, resample=True).ct - ct).max() < 1.0  # 0.0033 voxel shift
    raw = (d / "SUV.nii.gz").read_bytes()
    (d / "SUV.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated download
    with pytest.raises(DataError, match=r"SUV.nii.gz: cannot read.*corrupt"):
        load_study(d, resample=True)
    (d / "SUV.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(DataError, match=r"SUV.nii.gz: cannot read"):
        load_study(d, resample=True)


def test_unknown_folder_and_layout(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        find_studies(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PET/CT studies found"):
        find_studies(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown layout"):
        find_studies(tmp_path / "empty", layout="nifti")


# ----------------------------------------------------------------------------- data.check

def _break_some(root: Path) -> None:
    """Break four of the six tiny studies in four different ways."""
    dirs = sorted(p.parent for p in root.rglob("SUV.nii.gz"))
    (dirs[0] / "SEG.nii.gz").unlink()                                                       # PETCT_p01
    seg = nib.load(dirs[1] / "SEG.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj) + 3, TINY_AFFINE), dirs[1] / "SEG.nii.gz")  # PETCT_p02
    (dirs[2] / "CTres.nii.gz").write_bytes(b"\x1f\x8b garbage")                            # PETCT_p03
    pet = nib.load(dirs[4] / "SUV.nii.gz").get_fdata(dtype=np.float32)
    pet[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(pet, TINY_AFFINE), dirs[4] / "SUV.nii.gz")                    # PETCT_p04


def test_check_reports_every_bad_study(tiny_autopet_dir, tmp_path, capsys):
    root = _copy(tiny_autopet_dir, tmp_path)
    _break_some(root)
    before = _snapshot(root)
    bad = check_dataset(str(root))
    names = [b[0].case_id if isinstance(b[0], StudyRef) else b[0] for b in bad]
    assert names == ["PETCT_p01", "PETCT_p02", "PETCT_p03", "PETCT_p04"]
    assert "SEG.nii.gz" in bad[0][1] and "not binary" in bad[1][1]
    assert "CTres.nii.gz: cannot read" in bad[2][1] and "NaN" in bad[3][1]
    assert check_main([str(root)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 5 and out[-1].endswith("4 bad, 2 ok")
    assert check_main([str(tiny_autopet_dir)]) == 0
    assert check_main([str(tmp_path / "missing")]) == 2
    assert _snapshot(root) == before


@pytest.mark.slow  # a fresh interpreter imports the whole data package (torch): ~10 s on 2 busy cores
def test_check_cli_no_traceback(tiny_autopet_dir, tmp_path):
    root = _copy(tiny_autopet_dir, tmp_path)
    _break_some(root)
    proc = subprocess.run([sys.executable, "-m", "data.check", str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout.count("BAD ") == 4



# ----------------------------------------------------------------------------- organ labels

def _organs(shape=TINY_SHAPE, seed=0) -> np.ndarray:
    """Random integer labels 0..19: any misplaced voxel (a flip, a shift) shows."""
    return np.random.default_rng(seed).integers(0, 20, shape).astype(np.uint8)


def test_autopet_organs_found_and_loaded(tiny_autopet_dir, tmp_path):
    root = _copy(tiny_autopet_dir, tmp_path)
    refs = find_studies(root)
    assert all("organs" not in r.paths for r in refs) and load_study(refs[0]).organs is None
    organs = _organs()
    study_dir = Path(refs[0].paths["pet"]).parent
    nib.save(nib.Nifti1Image(organs, TINY_AFFINE), study_dir / "ORGANS.nii.gz")
    refs = find_studies(root)
    assert refs[0].paths["organs"] == str(study_dir / "ORGANS.nii.gz")
    assert all("organs" not in r.paths for r in refs[1:])
    s = load_study(refs[0])
    assert s.organs.dtype == np.uint8 and np.array_equal(s.organs, organs)


def test_flipped_organs_are_reoriented_exactly(tmp_path):
    ct, pet, mask = make_tiny_study(0, has_tumor=True)
    organs = _organs()
    d = write_autopet_study(tmp_path / "P1" / "s1", ct, pet, mask)
    flip_xz = np.array([[-1, 0, 0, TINY_SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, -1, TINY_SHAPE[2] - 1], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(organs[::-1, :, ::-1].copy(), TINY_AFFINE @ flip_xz), d / "ORGANS.nii.gz")
    assert np.array_equal(load_study(d).organs, organs)
    permuted = TINY_AFFINE[:, [1, 0, 2, 3]]  # X and Y swapped (a transposed export)
    nib.save(nib.Nifti1Image(organs.transpose(1, 0, 2).copy(), permuted), d / "ORGANS.nii.gz")
    assert np.array_equal(load_study(d).organs, organs)
    shifted = TINY_AFFINE.copy()
    shifted[0, 3] += 1.0  # half a voxel: no exact reorientation exists
    nib.save(nib.Nifti1Image(organs, shifted), d / "ORGANS.nii.gz")
    with pytest.raises(DataError, match=r"organ labels and PET grids differ.*ORGANS.nii.gz.*--resample=True"):
        load_study(d)


@pytest.mark.parametrize("bad,shown", [(0.5, "0.5"), (-1.0, "-1.0"), (300.0, "300.0"), (np.nan, "nan")])
def test_non_integer_organs_refused_with_file_name(tmp_path, bad, shown):
    ct, pet, mask = make_tiny_study(0, has_tumor=True)
    organs = _organs().astype(np.float32)
    organs[3, 4, 5] = bad
    d = write_autopet_study(tmp_path / "P1" / "s1", ct, pet, mask)
    nib.save(nib.Nifti1Image(organs, TINY_AFFINE), d / "ORGANS.nii.gz")
    with pytest.raises(DataError, match=rf"ORGANS.nii.gz: the organ labels of study P1 are not integers "
                                        rf"in 0..255 \(1 voxel\(s\), e.g. \[{shown}\]\); save integer labels"):
        load_study(d)


def test_nnunet_organs_tr_and_ts(tmp_path):
    root = _write_nnunet(tmp_path / "ds", {"c01": 0, "c02": 1})
    (root / "imagesTs").mkdir()
    for f in (root / "imagesTr").glob("c02_*"):
        f.rename(root / "imagesTs" / f.name)  # c02 becomes an unlabelled test case
    (root / "organsTr").mkdir()
    (root / "organsTs").mkdir()
    nib.save(nib.Nifti1Image(_organs(seed=1), TINY_AFFINE), root / "organsTr" / "c01.nii.gz")
    nib.save(nib.Nifti1Image(_organs(seed=2), TINY_AFFINE), root / "organsTs" / "c02.nii.gz")
    refs = {r.case_id: r for r in find_studies(root, require_mask=False)}
    assert refs["c01"].paths["organs"].endswith("organsTr/c01.nii.gz") and "mask" in refs["c01"].paths
    assert refs["c02"].paths["organs"].endswith("organsTs/c02.nii.gz") and "mask" not in refs["c02"].paths
    assert np.array_equal(load_study(refs["c01"]).organs, _organs(seed=1))
    assert np.array_equal(load_study(refs["c02"]).organs, _organs(seed=2))


def test_png_roundtrip_with_organs(tiny_autopet_dir, tmp_path):
    study = load_study(find_studies(tiny_autopet_dir)[0])
    study.organs = _organs()
    case_dir = write_png_study(study, tmp_path / "png" / "PETCT_p01")
    assert len(list((case_dir / "organs").glob("*.png"))) == TINY_SHAPE[2]
    (ref,) = find_studies(tmp_path / "png")
    assert ref.paths["organs"] == str(case_dir / "organs")
    back = load_study(ref)
    assert back.organs.dtype == np.uint8 and np.array_equal(back.organs, study.organs)
    assert np.array_equal(back.mask, study.mask)
