"""DICOM PET/CT reading (data/dicom.py): SUV arithmetic, slice order, geometry, CT -> PET grid."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data import DataError, find_studies, load_study
from data.check import check_dataset
from data.dicom import pet_suv_factor, read_series, suv_factor, write_series

WEIGHT, DOSE, HALF_LIFE = 70.0, 3.7e8, 6586.2  # kg, Bq, s (F-18)
# Hand computation for dt = 3000 s: 2 ** (-3000 / 6586.2) = 0.7292585, so
# f = 70 * 1000 / (3.7e8 * 0.7292585) = 2.5942680e-4 (SUV per Bq/ml); with ADMIN f = 70e3 / 3.7e8.
F_START_3000 = 2.5942680e-4
F_ADMIN = 1.8918919e-4
PET_SPACING, PET_ORIGIN = (4.0, 4.0, 3.0), (-20.0, -30.0, 100.0)  # LPS mm
PET_AFFINE = np.array([[-4.0, 0, 0, 20.0], [0, -4.0, 0, 30.0], [0, 0, 3.0, 100.0], [0, 0, 0, 1]])  # RAS


def _suv_volume(shape=(10, 8, 6)) -> np.ndarray:
    """SUV with a different maximum on every slice, so every slice gets its own RescaleSlope."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (0.5 + 0.1 * i + 0.05 * j) * (1.0 + k)  # (X, Y, Z)


def _write_pet(folder: Path, suv: np.ndarray, factor: float, **kwargs) -> list[Path]:
    kw = dict(weight_kg=WEIGHT, dose_bq=DOSE, half_life_s=HALF_LIFE, spacing=PET_SPACING, origin=PET_ORIGIN,
              series_time=datetime(2021, 3, 2, 0, 40), injection_time=datetime(2021, 3, 1, 23, 50),
              injection_tag="time")
    kw.update(kwargs)
    return write_series(folder, suv / factor, modality="PT", **kw)


def test_suv_factor_hand_computed():
    assert suv_factor(WEIGHT, DOSE, HALF_LIFE, 3000.0, "START") == pytest.approx(F_START_3000, rel=1e-6)
    assert suv_factor(WEIGHT, DOSE, HALF_LIFE, 3000.0, "ADMIN") == pytest.approx(F_ADMIN, rel=1e-6)
    one_half_life = suv_factor(WEIGHT, DOSE, HALF_LIFE, HALF_LIFE, "START")
    assert one_half_life == pytest.approx(2 * 70e3 / 3.7e8, rel=1e-12)  # decayed to half: twice ADMIN
    with pytest.raises(DataError, match="NONE"):
        suv_factor(WEIGHT, DOSE, HALF_LIFE, 0.0, "NONE")


def test_suv_midnight_and_per_slice_slopes(tmp_path):
    """Injection 23:50 (time only), series 00:40 the next day: dt = 50 min = 3000 s."""
    suv = _suv_volume()
    files = _write_pet(tmp_path / "pet", suv, F_START_3000)
    slopes = {float(pydicom.dcmread(f, stop_before_pixels=True).RescaleSlope) for f in files}
    assert len(slopes) == suv.shape[2]  # one slope per slice
    values, affine, dss = read_series([str(f) for f in files])
    assert pet_suv_factor(dss) == pytest.approx(F_START_3000, rel=1e-6)
    # stored uint16 with slope = slice max / 65535: error <= half a step of the largest slice
    np.testing.assert_allclose(values * pet_suv_factor(dss), suv, atol=suv.max() / 65535)
    # the same with the full RadiopharmaceuticalStartDateTime
    files = _write_pet(tmp_path / "pet_dt", suv, F_START_3000, injection_tag="datetime")
    assert pet_suv_factor(read_series([str(f) for f in files])[2]) == pytest.approx(F_START_3000, rel=1e-6)


def test_suv_admin_vs_start(tmp_path):
    suv = _suv_volume()
    bqml = suv / F_START_3000  # same activity concentrations written twice
    start = read_series([str(f) for f in write_series(tmp_path / "s", bqml, modality="PT", decay_correction="START",
                                                       weight_kg=WEIGHT, dose_bq=DOSE, half_life_s=HALF_LIFE,
                                                       series_time=datetime(2021, 3, 2, 0, 40),
                                                       injection_time=datetime(2021, 3, 1, 23, 50),
                                                       spacing=PET_SPACING)])[2]
    admin = read_series([str(f) for f in write_series(tmp_path / "a", bqml, modality="PT", decay_correction="ADMIN",
                                                       weight_kg=WEIGHT, dose_bq=DOSE, half_life_s=HALF_LIFE,
                                                       series_time=datetime(2021, 3, 2, 0, 40),
                                                       injection_time=datetime(2021, 3, 1, 23, 50),
                                                       spacing=PET_SPACING)])[2]
    assert pet_suv_factor(admin) == pytest.approx(F_ADMIN, rel=1e-6)  # no decay factor
    assert pet_suv_factor(start) / pet_suv_factor(admin) == pytest.approx(2 ** (3000 / HALF_LIFE), rel=1e-6)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(weight_kg=None), r"IM0000.dcm: PatientWeight \(0010,1030\) is missing"),
    (dict(units="CNTS"), r"IM0000.dcm: PET Units is CNTS, expected BQML \(Philips CNTS needs the vendor SUV scale"),
    (dict(decay_correction="NONE"), r"IM0000.dcm: DecayCorrection is NONE"),
    (dict(radiopharm_tags={"RadionuclideTotalDose": None}), r"IM0000.dcm: RadionuclideTotalDose is missing"),
    (dict(radiopharm_tags={"RadiopharmaceuticalStartTime": None}), r"IM0000.dcm: Radiopharmaceutical.*injection time"),
    (dict(tags={"SeriesTime": None, "AcquisitionTime": None}), r"IM0000.dcm: SeriesDate/SeriesTime.*missing"),
])
def test_suv_refuses_missing_tags(tmp_path, kwargs, pattern):
    files = _write_pet(tmp_path / "pet", _suv_volume((4, 4, 2)), F_START_3000, **kwargs)
    with pytest.raises(DataError, match=pattern):
        pet_suv_factor(read_series([str(f) for f in files])[2])


def test_slice_order_from_positions_not_names(tmp_path):
    ct = np.arange(6 * 5 * 9, dtype=np.float64).reshape(6, 5, 9) - 200.0  # HU, unique per voxel
    files = write_series(tmp_path / "ct", ct, modality="CT", spacing=(1.0, 1.5, 2.0), origin=(5.0, 6.0, 7.0),
                         shuffle_seed=3)
    z_by_name = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in sorted(files)]
    assert z_by_name != sorted(z_by_name)  # file names (and InstanceNumber) do not follow the position
    values, affine, _ = read_series([str(f) for f in sorted(files)])
    assert np.array_equal(values, ct)  # (X, Y, Z) in HU: X = column index, Y = row index
    expect = np.array([[-1.0, 0, 0, -5.0], [0, -1.5, 0, -6.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, expect, atol=1e-9)  # LPS -> RAS


def _write_dicom_study(study_dir: Path, patient: str, suv: np.ndarray, mask: np.ndarray | None, **pet_kwargs):
    """A PET series (4 mm grid), a CT series (2 mm grid, HU linear in LPS position), SEG.nii.gz on the PET grid."""
    _write_pet(study_dir / "PET AC", suv, F_START_3000, patient_id=patient, **pet_kwargs)
    shape = (2 * suv.shape[0], 2 * suv.shape[1], suv.shape[2])
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ct_origin = (PET_ORIGIN[0] - 1.0, PET_ORIGIN[1] - 1.0, PET_ORIGIN[2])  # CT voxel centres straddle PET's
    x, y, z = ct_origin[0] + 2.0 * i, ct_origin[1] + 2.0 * j, ct_origin[2] + 3.0 * k
    write_series(study_dir / "CT 2mm", 2.0 * x - 3.0 * y + z, modality="CT", spacing=(2.0, 2.0, 3.0),
                 origin=ct_origin, patient_id=patient, shuffle_seed=0,
                 series_time=pet_kwargs.get("series_time", datetime(2021, 3, 2, 0, 40)))  # same StudyInstanceUID
    if mask is not None:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), PET_AFFINE), study_dir / "SEG.nii.gz")


def test_dicom_study_end_to_end(tmp_path):
    suv = _suv_volume()
    mask = (suv > 5).astype(np.uint8)
    root = tmp_path / "dicom"
    _write_dicom_study(root / "PAT001" / "study A", "PAT001", suv, mask)
    _write_dicom_study(root / "PAT001" / "study B", "PAT001", suv, None,
                       series_time=datetime(2022, 1, 1, 10, 0), injection_time=datetime(2022, 1, 1, 9, 10))
    (root / "PAT002" / "notes.txt").parent.mkdir(parents=True)
    (root / "PAT002" / "notes.txt").write_text("not DICOM")
    refs = find_studies(root, require_mask=False)  # layout auto-detected
    assert [(r.case_id, r.patient_id, r.layout) for r in refs] == [("PAT001", "PAT001", "dicom"),
                                                                   ("PAT001_2", "PAT001", "dicom")]
    s = load_study(refs[0])
    assert s.pet.shape == s.ct.shape == s.mask.shape == suv.shape and s.spacing == PET_SPACING
    np.testing.assert_allclose(s.affine, PET_AFFINE, atol=1e-9)
    np.testing.assert_allclose(s.pet, suv, atol=suv.max() / 65535)
    assert np.array_equal(s.mask, mask)
    # CT resampled (trilinear) onto PET voxel centres reproduces the linear HU function there
    i, j, k = np.meshgrid(*(np.arange(n) for n in suv.shape), indexing="ij")
    x, y, z = PET_ORIGIN[0] + 4.0 * i, PET_ORIGIN[1] + 4.0 * j, PET_ORIGIN[2] + 3.0 * k
    np.testing.assert_allclose(s.ct, np.rint(2.0 * x - 3.0 * y + z), atol=1e-3)
    assert load_study(refs[1]).mask is None
    with pytest.raises(DataError, match="study B: no mask"):
        find_studies(root)
    bad = check_dataset(str(root), require_mask=False)
    assert bad == []


def test_dicom_study_without_pet_and_missing_weight_reported_together(tmp_path):
    root = tmp_path / "dicom"
    write_series(root / "P1" / "ct", np.zeros((4, 4, 3)), modality="CT", spacing=(1, 1, 1), patient_id="P1")
    _write_dicom_study(root / "P2" / "s", "P2", _suv_volume((4, 4, 3)), None, weight_kg=None)
    bad = check_dataset(str(root), require_mask=False)
    assert len(bad) == 2
    assert "has no PET (Modality PT) series" in bad[0][1]
    assert "PatientWeight" in bad[1][1] and "IM0000.dcm" in bad[1][1]


def test_dicom_study_with_organ_labels(tmp_path):
    """An ORGANS NIfTI beside the series is read on the PET grid; a name with "organ" and "seg"
    (TotalSegmentator output) is never taken for the tumour mask."""
    suv = _suv_volume()
    mask = (suv > 5).astype(np.uint8)
    organs = np.random.default_rng(0).integers(0, 12, suv.shape).astype(np.uint8)
    study_dir = tmp_path / "dicom" / "PAT001" / "study A"
    _write_dicom_study(study_dir, "PAT001", suv, mask)
    nib.save(nib.Nifti1Image(organs, PET_AFFINE), study_dir / "organs_totalseg.nii.gz")
    (ref,) = find_studies(tmp_path / "dicom")
    assert ref.paths["organs"] == str(study_dir / "organs_totalseg.nii.gz")
    assert ref.paths["mask"] == str(study_dir / "SEG.nii.gz")
    s = load_study(ref)
    assert s.organs.dtype == np.uint8 and np.array_equal(s.organs, organs)
    assert np.array_equal(s.mask, mask)
    nib.save(nib.Nifti1Image(organs, PET_AFFINE), study_dir / "ORGANS.nii.gz")
    with pytest.raises(DataError, match="several organ label files"):
        find_studies(tmp_path / "dicom")
