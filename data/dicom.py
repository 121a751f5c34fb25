"""DICOM PET/CT: series discovery, slice ordering, SUV, CT onto the PET grid, and a test writer.

A DICOM study is found by its StudyInstanceUID anywhere below the data folder; it needs one CT
and one PET (Modality PT) series, told apart by Modality and SeriesInstanceUID, not by folder
names. Several candidates: the PET series that is attenuation corrected (CorrectedImage holds
ATTN), then the one with most slices; the CT series with most slices. Files are recognised by the
"DICM" marker at byte 128 (files without the DICOM preamble are not read).

- Slices are ordered by ImagePositionPatient projected on the slice normal
  (row direction x column direction of ImageOrientationPatient), never by file name or
  InstanceNumber; duplicated positions or uneven spacing are refused.
- Values: stored * RescaleSlope + RescaleIntercept, per slice (PET slopes differ per slice).
- Array axes: X = DICOM column index, Y = row index, Z = sorted slice; the affine is built from
  ImagePositionPatient / ImageOrientationPatient / PixelSpacing in LPS and flipped to RAS
  (nibabel's convention): RAS = diag(-1, -1, 1) LPS.
- SUV body weight (docs/data.md, "SUV from DICOM"), Units must be BQML:
      SUVbw = C[Bq/ml] * PatientWeight[kg] * 1000 / (RadionuclideTotalDose[Bq] * D)
  D = 2 ** (-dt / RadionuclideHalfLife[s]) when DecayCorrection is START (images decay-corrected
  to the series start: the dose must be decayed from injection to that time), D = 1 when it is
  ADMIN (images already corrected to the administration time). NONE is refused: the decay would
  then differ per frame (FrameReferenceTime), which this reader does not model.
  dt = scan time - injection time; scan time = SeriesDate/SeriesTime, or the earliest
  AcquisitionDate/AcquisitionTime when the series time is missing or later (re-processed series);
  injection = RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on the scan
  date, moved one day back when that lies after the scan (injection 23:50, scan 00:40 -> 50 min).
- Mask: a NIfTI file whose name contains "seg" (e.g. SEG.nii.gz) in the study folder (the common
  folder of the CT and PET series) or below it, on the PET grid.
- Organ labels (optional): a NIfTI file whose name contains "organ" (e.g. ORGANS.nii.gz, or
  organs_totalseg.nii.gz: a name with "organ" is never taken for the mask) in the same place,
  integer labels on the PET grid.
pydicom is imported inside the functions so that `import data` stays light.
"""
from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from .geometry import assemble_study, read_label_volumes, resample_to_grid, same_grid
from .study import DataError, Study, StudyRef, safe_id

log = logging.getLogger(__name__)

_NOT_DICOM = (".nii", ".gz", ".json", ".png", ".txt", ".csv", ".npy", ".xlsx", ".md", ".jpg", ".zip")
_SCAN_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "StudyDate", "StudyTime",
              "CorrectedImage", "PatientID"]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """True for a file with the DICOM preamble ("DICM" at byte 128)."""
    path = str(path)
    if path.lower().endswith(_NOT_DICOM) or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _dicom_files(folder: str | os.PathLike) -> list[str]:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if looks_like_dicom(os.path.join(root, f)))


# ----------------------------------------------------------------------------- discovery

def _pick(series: dict[str, dict], modality: str) -> str | None:
    candidates = [uid for uid, s in series.items() if s["modality"] == modality]
    if not candidates:
        return None
    key = lambda uid: ("ATTN" in series[uid]["corrected"], len(series[uid]["files"]), uid)  # noqa: E731
    return max(candidates, key=key)


def scan_dicom(data_dir: str | os.PathLike, require_mask: bool = True) -> tuple[list[StudyRef], list]:
    """Find DICOM PET/CT studies below `data_dir` (headers only) -> (refs, [(where, problem)])."""
    import pydicom

    d = Path(data_dir)
    studies: dict[str, dict] = {}
    for f in _dicom_files(d):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
        except Exception as e:
            log.warning("%s: unreadable DICOM header (%s), skipped", f, e)
            continue
        if "SeriesInstanceUID" not in ds or "Modality" not in ds:
            continue  # DICOMDIR, structured reports, ...
        st = studies.setdefault(str(ds.get("StudyInstanceUID", "")), {
            "series": {}, "date": f"{ds.get('StudyDate', '')}{ds.get('StudyTime', '')}",
            "patient": str(ds.get("PatientID", "") or "")})
        se = st["series"].setdefault(str(ds.SeriesInstanceUID), {
            "modality": str(ds.Modality), "files": [], "corrected": list(ds.get("CorrectedImage", []) or [])})
        se["files"].append(f)
    refs, problems, found = [], [], []
    for study_uid, st in studies.items():
        ct_uid, pet_uid = _pick(st["series"], "CT"), _pick(st["series"], "PT")
        files = [f for uid in (ct_uid, pet_uid) if uid for f in st["series"][uid]["files"]]
        folder = Path(os.path.commonpath(files)) if files else d
        folder = folder if folder.is_dir() else folder.parent
        rel = folder.relative_to(d).parts
        patient_folder = rel[0] if rel else d.name
        if ct_uid is None or pet_uid is None:
            missing = "CT" if ct_uid is None else "PET (Modality PT)"
            problems.append((str(folder), f"{folder}: DICOM study {study_uid} has no {missing} series; "
                                          f"add it or remove the study"))
            continue
        found.append((patient_folder, st["date"], study_uid, folder, ct_uid, pet_uid, st))
    per_patient: dict[str, int] = {}
    for patient_folder, _, study_uid, folder, ct_uid, pet_uid, st in sorted(found, key=lambda t: t[:3]):
        k = per_patient[patient_folder] = per_patient.get(patient_folder, 0) + 1
        case_id = safe_id(patient_folder) + (f"_{k}" if k > 1 else "")
        paths = {"study": str(folder),
                 "ct": os.path.commonpath(st["series"][ct_uid]["files"]),
                 "pet": os.path.commonpath(st["series"][pet_uid]["files"])}
        for role in ("ct", "pet"):
            if not os.path.isdir(paths[role]):  # a one-slice series: commonpath is the file
                paths[role] = os.path.dirname(paths[role])
        niftis = sorted(folder.rglob("*.nii*"))
        organs = [p for p in niftis if "organ" in p.name.lower()]
        masks = [p for p in niftis if "seg" in p.name.lower() and p not in organs]
        if len(masks) > 1:
            problems.append((case_id, f"{folder}: several masks {[str(m) for m in masks]}; keep one SEG.nii.gz"))
            continue
        if len(organs) > 1:
            problems.append((case_id, f"{folder}: several organ label files {[str(o) for o in organs]}; "
                                      f"keep one ORGANS.nii.gz"))
            continue
        if organs:
            paths["organs"] = str(organs[0])
        if masks:
            paths["mask"] = str(masks[0])
        elif require_mask:
            problems.append((case_id, f"{folder}: no mask (a NIfTI SEG.nii.gz on the PET grid) in the study "
                                      f"folder; add it or use the study for prediction only (require_mask=False)"))
            continue
        refs.append(StudyRef(case_id, safe_id(st["patient"] or patient_folder), "dicom", paths,
                             {"ct": ct_uid, "pet": pet_uid}))
    return refs, problems


# ----------------------------------------------------------------------------- reading a series

def read_series(files: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
    """Read one series -> (float32 (X, Y, Z) rescaled values, float64 (4, 4) RAS affine,
    datasets sorted by position)."""
    import pydicom

    dss = []
    for f in files:
        try:
            dss.append(pydicom.dcmread(f))
        except Exception as e:
            raise DataError(f"{f}: cannot read DICOM ({type(e).__name__}: {e}); re-export the series") from None
    first = dss[0]
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        missing = [ds.filename for ds in dss if tag not in ds]
        if missing:
            raise DataError(f"{missing[0]}: no {tag}; the slice geometry is unknown - re-export with geometry tags")
    iop = np.array(first.ImageOrientationPatient, np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pixel_spacing = np.array(first.PixelSpacing, np.float64)
    for ds in dss:
        if not np.allclose(np.array(ds.ImageOrientationPatient, np.float64), iop, atol=1e-4) or \
                (ds.Rows, ds.Columns) != (first.Rows, first.Columns) or \
                not np.allclose(np.array(ds.PixelSpacing, np.float64), pixel_spacing, atol=1e-4):
            raise DataError(f"{ds.filename}: orientation, size or pixel spacing differs from {first.filename} "
                            f"in the same series; the series mixes acquisitions - split or re-export it")
    position = np.array([ds.ImagePositionPatient for ds in dss], np.float64)  # (Z, 3) LPS mm
    order = np.argsort(position @ normal, kind="stable")
    dss, position = [dss[i] for i in order], position[order]
    steps = np.diff(position @ normal)
    if len(steps) and steps.min() < 1e-3:
        i = int(np.argmin(steps))
        raise DataError(f"{dss[i + 1].filename}: same slice position as {dss[i].filename}; the folder mixes "
                        f"series or time frames - keep one series per folder")
    if len(steps) > 1 and np.abs(steps - np.median(steps)).max() > 0.01 * np.median(steps) + 1e-3:
        i = int(np.argmax(np.abs(steps - np.median(steps))))
        raise DataError(f"{dss[i + 1].filename}: uneven slice spacing ({steps[i]:.3f} mm vs median "
                        f"{np.median(steps):.3f} mm; a slice is missing?) - re-export the complete series")
    slices = []
    for ds in dss:
        try:
            pixels = ds.pixel_array
        except Exception as e:
            raise DataError(f"{ds.filename}: cannot decode pixels ({type(e).__name__}: {e}); decompress the "
                            f"series (e.g. `gdcmconv --raw`) or install a pydicom pixel handler") from None
        if pixels.ndim != 2:
            raise DataError(f"{ds.filename}: multi-frame image of shape {pixels.shape}; "
                            f"only one slice per file is supported")
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        slices.append((pixels.astype(np.float32) * slope + intercept).T)  # (cols, rows) = (X, Y)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if len(dss) > 1:
        step = (position[-1] - position[0]) / (len(dss) - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_spacing, col_dir * row_spacing, step, position[0]
    return np.stack(slices, axis=2), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, dss


def _series_files(folder: str, series_uid: str) -> list[str]:
    import pydicom

    files = [f for f in _dicom_files(folder)
             if str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                    .get("SeriesInstanceUID", "")) == series_uid]
    if not files:
        raise DataError(f"{folder}: series {series_uid} not found any more; run find_studies again")
    return files


# ----------------------------------------------------------------------------- SUV

def suv_factor(weight_kg: float, dose_bq: float, half_life_s: float, delta_t_s: float,
               decay_correction: str = "START") -> float:
    """Factor f with SUVbw = C[Bq/ml] * f:  f = weight_kg * 1000 / (dose_bq * D),
    D = 2 ** (-delta_t_s / half_life_s) for START, D = 1 for ADMIN (docs/data.md, "SUV from DICOM")."""
    if decay_correction == "ADMIN":
        decay = 1.0
    elif decay_correction == "START":
        decay = 2.0 ** (-delta_t_s / half_life_s)
    else:
        raise DataError(f"DecayCorrection {decay_correction!r} is not supported; expected START or ADMIN")
    return weight_kg * 1000.0 / (dose_bq * decay)


def _parse_time(tm: str) -> timedelta:
    s = str(tm).strip().replace(":", "")
    hours = int(s[0:2])
    minutes = int(s[2:4]) if len(s) >= 4 else 0
    seconds = float(s[4:]) if len(s) > 4 else 0.0
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def _parse_datetime(date: str, time: str) -> datetime:
    return datetime.strptime(str(date).strip()[:8], "%Y%m%d") + _parse_time(time)


def _scan_time(dss: list) -> datetime | None:
    acquired = [_parse_datetime(ds.AcquisitionDate, ds.AcquisitionTime) for ds in dss
                if ds.get("AcquisitionDate") and ds.get("AcquisitionTime")]
    first = dss[0]
    series = (_parse_datetime(first.SeriesDate, first.SeriesTime)
              if first.get("SeriesDate") and first.get("SeriesTime") else None)
    if series is not None and (not acquired or series <= min(acquired)):
        return series
    return min(acquired) if acquired else None


def pet_suv_factor(dss: list) -> float:
    """SUVbw factor for a PET series (datasets sorted by position); DataError naming the file if a tag is missing."""
    ds = dss[0]
    where = ds.filename
    units = str(ds.get("Units", "")).upper()
    if units != "BQML":
        hint = (" (Philips CNTS needs the vendor SUV scale factor, private tag (7053,1000), to convert)"
                if units == "CNTS" else "")
        raise DataError(f"{where}: PET Units is {units or 'missing'}, expected BQML{hint}; "
                        f"export the PET in Bq/ml or convert it to SUV NIfTI first")
    weight = float(ds.get("PatientWeight", 0) or 0)
    if weight <= 0:
        raise DataError(f"{where}: PatientWeight (0010,1030) is missing or 0; SUV needs the weight in kg - "
                        f"add it to the PET series (e.g. with dcmodify) or provide SUV NIfTI")
    info = (ds.get("RadiopharmaceuticalInformationSequence") or [None])[0]
    if info is None:
        raise DataError(f"{where}: no RadiopharmaceuticalInformationSequence; SUV needs the injected dose, "
                        f"half life and injection time - add them or provide SUV NIfTI")
    dose, half_life = float(info.get("RadionuclideTotalDose", 0) or 0), float(info.get("RadionuclideHalfLife", 0) or 0)
    for name, value in (("RadionuclideTotalDose", dose), ("RadionuclideHalfLife", half_life)):
        if value <= 0:
            raise DataError(f"{where}: {name} is missing or 0; SUV cannot be computed - add it or provide SUV NIfTI")
    correction = str(ds.get("DecayCorrection", "")).upper()
    if correction == "ADMIN":
        return suv_factor(weight, dose, half_life, 0.0, "ADMIN")
    if correction != "START":
        raise DataError(f"{where}: DecayCorrection is {correction or 'missing'}; only START and ADMIN are "
                        f"supported (NONE would need per-frame decay) - reconstruct with decay correction")
    scan = _scan_time(dss)
    if scan is None:
        raise DataError(f"{where}: SeriesDate/SeriesTime and AcquisitionDate/AcquisitionTime missing; "
                        f"SUV needs the scan time")
    if info.get("RadiopharmaceuticalStartDateTime"):
        s = re.split(r"[+&-]", str(info.RadiopharmaceuticalStartDateTime).strip())[0]
        injection = _parse_datetime(s[:8], s[8:] or "000000")
    elif info.get("RadiopharmaceuticalStartTime"):
        injection = datetime.combine(scan.date(), datetime.min.time()) + _parse_time(info.RadiopharmaceuticalStartTime)
        if injection > scan:  # injected before midnight, scanned after it
            injection -= timedelta(days=1)
    else:
        raise DataError(f"{where}: RadiopharmaceuticalStartDateTime / StartTime missing; SUV needs the "
                        f"injection time")
    delta = (scan - injection).total_seconds()
    if delta < 0:
        raise DataError(f"{where}: injection ({injection}) after the scan ({scan}); check the DICOM times")
    return suv_factor(weight, dose, half_life, delta, "START")


def load_dicom_study(ref: StudyRef, resample: bool = False) -> Study:
    """Read a DICOM StudyRef: PET -> SUV, CT (HU) resampled onto the PET grid, optional NIfTI mask
    and organ labels."""
    pet_raw, pet_affine, pet_dss = read_series(_series_files(ref.paths["pet"], ref.series_uids["pet"]))
    pet = pet_raw * np.float32(pet_suv_factor(pet_dss))
    ct, ct_affine, _ = read_series(_series_files(ref.paths["ct"], ref.series_uids["ct"]))
    if not same_grid(ct.shape, ct_affine, pet.shape, pet_affine):
        ct = resample_to_grid(ct, ct_affine, pet_affine, pet.shape, order=1, cval=-1000.0)
    return assemble_study(ct=ct, ct_affine=pet_affine, ct_path=ref.paths["ct"], pet=pet, pet_affine=pet_affine,
                          pet_path=ref.paths["pet"], **read_label_volumes(ref.paths),
                          case_id=ref.case_id, patient_id=ref.patient_id,
                          source=ref.paths["study"], resample=resample)


# ----------------------------------------------------------------------------- writer (tests, phantom export)

def _ds_str(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds
    return format_number_as_ds(float(value))


def _apply_tags(ds, tags: dict | None) -> None:
    """Override (value) or delete (None) attributes of a dataset."""
    for key, value in (tags or {}).items():
        if value is not None:
            setattr(ds, key, value)
        elif key in ds:
            delattr(ds, key)


def _pet_pixels(ds, plane: np.ndarray, *, units: str, decay_correction: str,
                weight_kg: float | None, dose_bq: float, half_life_s: float,
                injection_time: datetime, injection_tag: str, radiopharm_tags: dict | None) -> np.ndarray:
    """The PET tags of one slice (per-slice RescaleSlope = slice max / 65535, SUV tags); returns
    the stored uint16 pixels (rows, cols)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    slope = float(_ds_str(max(plane.max(), 1e-6) / 65535.0))
    ds.RescaleSlope, ds.RescaleIntercept = _ds_str(slope), "0"
    ds.PixelRepresentation = 0
    ds.Units, ds.DecayCorrection, ds.CorrectedImage = units, decay_correction, ["ATTN", "DECY"]
    if weight_kg is not None:
        ds.PatientWeight = _ds_str(weight_kg)
    item = Dataset()
    item.RadionuclideTotalDose, item.RadionuclideHalfLife = _ds_str(dose_bq), _ds_str(half_life_s)
    if injection_tag == "datetime":
        item.RadiopharmaceuticalStartDateTime = injection_time.strftime("%Y%m%d%H%M%S.%f")
    else:
        item.RadiopharmaceuticalStartTime = injection_time.strftime("%H%M%S.%f")
    _apply_tags(item, radiopharm_tags)
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    return np.clip(np.rint(plane / slope), 0, 65535).astype(np.uint16)


def _slice_dataset(path: Path, *, z: int, name: int, is_pet: bool, modality: str, shape: tuple,
                   spacing: tuple, origin: tuple, patient_id: str, study_uid: str,
                   series_uid: str, series_time: datetime):
    """The header of slice z of a series: UIDs, dates, geometry, pixel format."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid(entropy_srcs=[series_uid, str(z)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE if is_pet else CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, modality
    ds.PatientID, ds.PatientName = patient_id, patient_id
    ds.StudyDate, ds.StudyTime = series_time.strftime("%Y%m%d"), series_time.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
    ds.AcquisitionDate, ds.AcquisitionTime = ds.StudyDate, ds.StudyTime
    ds.SeriesNumber, ds.InstanceNumber = 2 if is_pet else 1, name + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [_ds_str(origin[0]), _ds_str(origin[1]), _ds_str(origin[2] + z * spacing[2])]
    ds.PixelSpacing = [_ds_str(spacing[1]), _ds_str(spacing[0])]  # [between rows (Y), between columns (X)]
    ds.SliceThickness = _ds_str(spacing[2])
    ds.Rows, ds.Columns = shape[1], shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    return ds


def write_series(folder: str | os.PathLike, volume: np.ndarray, *, modality: str,
                 spacing: tuple[float, float, float], origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 patient_id: str = "PHANTOM", study_uid: str | None = None, series_uid: str | None = None,
                 series_time: datetime = datetime(2020, 1, 1, 10, 0, 0),
                 injection_time: datetime = datetime(2020, 1, 1, 9, 0, 0), injection_tag: str = "datetime",
                 weight_kg: float | None = 75.0, dose_bq: float = 3.0e8, half_life_s: float = 6586.2,
                 decay_correction: str = "START", units: str = "BQML", shuffle_seed: int | None = None,
                 tags: dict | None = None, radiopharm_tags: dict | None = None) -> list[Path]:
    """Write a (X, Y, Z) volume as an axial DICOM series, one file per slice. For tests and the
    phantom's DICOM export; not a general-purpose DICOM writer.

    modality "CT": `volume` in HU, stored int16 with RescaleIntercept -1024, slope 1.
    modality "PT": `volume` in Bq/ml, stored uint16 with a per-slice RescaleSlope = slice max / 65535.
    Geometry: ImageOrientationPatient (1,0,0,0,1,0), slice z at LPS origin + (0, 0, z * spacing[2]),
    i.e. RAS affine diag(-sx, -sy, sz) with translation (-ox, -oy, oz). File names are IM<k>.dcm
    with k = z, or a random permutation of z with `shuffle_seed` (InstanceNumber follows the
    name, so only the position tells the order). `injection_tag` "datetime" writes
    RadiopharmaceuticalStartDateTime, "time" only RadiopharmaceuticalStartTime. `tags` /
    `radiopharm_tags` override (value) or delete (None) attributes of every slice / of the
    radiopharmaceutical item, e.g. {"PatientWeight": None}. UIDs are deterministic per
    (patient_id, series_time): give the CT and PET of one study the same series_time (or pass study_uid).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume, np.float64)
    n_z = volume.shape[2]
    study_uid = study_uid or generate_uid(entropy_srcs=[patient_id, "study", series_time.isoformat()])
    series_uid = series_uid or generate_uid(entropy_srcs=[patient_id, study_uid, modality])
    names = np.random.default_rng(shuffle_seed).permutation(n_z) if shuffle_seed is not None else np.arange(n_z)
    is_pet = modality == "PT"
    paths = []
    for z in range(n_z):
        path = folder / f"IM{int(names[z]):04d}.dcm"
        ds = _slice_dataset(path, z=z, name=int(names[z]), is_pet=is_pet, modality=modality,
                            shape=volume.shape, spacing=spacing, origin=origin,
                            patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                            series_time=series_time)
        plane = volume[:, :, z].T  # (rows, cols) = (Y, X)
        if is_pet:
            stored = _pet_pixels(ds, plane, units=units, decay_correction=decay_correction,
                                 weight_kg=weight_kg, dose_bq=dose_bq, half_life_s=half_life_s,
                                 injection_time=injection_time, injection_tag=injection_tag,
                                 radiopharm_tags=radiopharm_tags)
        else:
            ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
            ds.PixelRepresentation, stored = 1, np.clip(np.rint(plane + 1024), -32768, 32767).astype(np.int16)
        _apply_tags(ds, tags)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths
