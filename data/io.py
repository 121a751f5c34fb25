"""Find and read PET/CT studies: autoPET NIfTI, nnU-Net raw, DICOM and PNG slice folders.

    refs = find_studies("/data/autoPET")          # list[StudyRef], sorted, nothing read yet
    study = load_study(refs[0])                   # Study: CT (HU) and PET (SUV) on the PET grid

Layouts ("auto" detects them in this order):
- "nnunet":  <dir>/imagesTr|imagesTs/<case>_<XXXX>.nii.gz and labelsTr|labelsTs/<case>.nii.gz;
             optional organ labels organsTr|organsTs/<case>.nii.gz (the folder beside
             labelsTr / labelsTs of the same split, named like the label file).
             The channel order is explicit (`ct_channel`, `pet_channel`; autoPET III: 0 = CT,
             1 = PET; the autoPET I baseline used the opposite). `dataset.json` channel_names
             (or v1 "modality") is cross-checked: a name saying PET on the CT channel or CT on
             the PET channel (while the CT channel is not also named CT, as autoPET III does so
             that nnU-Net normalises both alike) is refused. Unlabelled imagesTs cases are skipped
             when `require_mask=True`.
- "png":     <dir>/<case>/{ct,pet,mask}/<z>.png, optional <case>/organs/<z>.png (8-bit integer
             labels), see `write_png_study` for the encoding.
- "autopet": <dir>/<patient>/<study>/{SUV,CTres,SEG}.nii.gz at any depth (folder names may hold
             spaces; CT.nii.gz / PET.nii.gz are ignored; CT.nii.gz is used only when CTres is
             absent, and then needs resample=True); optional ORGANS.nii.gz in the study folder.
- "dicom":   a CT and a PET series anywhere below a study folder, see data/dicom.py; optional
             organ labels: a NIfTI whose name contains "organ" (e.g. ORGANS.nii.gz) in it.

Organ labels (all layouts, optional): integer labels 0..255 on the PET grid (or one that
differs only by axis flips / permutations; other grids need resample=True, nearest), read into
`Study.organs` and found as `StudyRef.paths["organs"]`. The phantom writes the map of
data/organs.py (ORGAN_LABELS); a user's own file, e.g. TotalSegmentator output saved as
ORGANS.nii.gz, keeps its own label values, and its number of classes (max label + 1) is what
the dataset, model and loss must be given, the same for every study.

Ids: the first study of a patient folder gets case_id = the folder name, later ones (sorted by
study folder name) `<patient>_2`, `<patient>_3`, ... For nnU-Net / PNG case names the patient id
is the case name, except that a trailing `_<one digit>` is stripped when the stripped name is
itself a case (our own `<patient>_2` convention) and the autoPET names `PETCT_<hash>_<study>` /
`fdg_<hash>_<date>` / `psma_<hash>_<date>` map to `PETCT_<hash>` / `fdg_<hash>` / `psma_<hash>`.
Geometry, NIfTI reading and study assembly live in `data/geometry.py` (shared with the DICOM
reader, which this module dispatches to). Nothing is ever written under the data folder.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from .dicom import load_dicom_study, looks_like_dicom, scan_dicom
from .geometry import assemble_study, read_label_volumes, read_nifti
from .study import DataError, Study, StudyRef, safe_id

log = logging.getLogger(__name__)

LAYOUTS = ("autopet", "nnunet", "dicom", "png")
Problem = tuple[str, str]  # (where: case id or path, message)


# ----------------------------------------------------------------------------- layout detection

def _is_png_case(folder: Path) -> bool:
    return (folder / "ct").is_dir() and (folder / "pet").is_dir() and any((folder / "pet").glob("*.png"))


def _png_cases(data_dir: Path) -> list[Path]:
    if _is_png_case(data_dir):
        return [data_dir]
    return sorted(p for p in data_dir.iterdir() if p.is_dir() and _is_png_case(p))


def detect_layout(data_dir: str | os.PathLike) -> str:
    """Guess the layout of `data_dir`; DataError when it holds nothing we can read."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: data folder not found; pass --data_dir=<folder with the studies>")
    if d.name in ("imagesTr", "imagesTs") or (d / "imagesTr").is_dir() or (d / "imagesTs").is_dir():
        return "nnunet"
    if _png_cases(d):
        return "png"
    for _, _, files in os.walk(d):
        if "SUV.nii.gz" in files:
            return "autopet"
    for root, _, files in os.walk(d):
        if any(looks_like_dicom(os.path.join(root, f)) for f in files):
            return "dicom"
    raise DataError(f"{d}: no PET/CT studies found; expected the autoPET layout "
                    f"(<patient>/<study>/SUV.nii.gz, CTres.nii.gz, SEG.nii.gz), the nnU-Net layout "
                    f"(imagesTr/<case>_0000.nii.gz ...), DICOM series, or PNG slice folders (<case>/ct, pet)")


# ----------------------------------------------------------------------------- scanners

def _patient_ids(case_names: list[str]) -> dict[str, str]:
    """Case name -> patient id for flat layouts (nnU-Net, PNG); rule in the module docstring."""
    names = set(case_names)
    out = {}
    for name in case_names:
        m = re.match(r"^((?:PETCT|fdg|psma)_[0-9a-fA-F]+)(?:_|$)", name)
        base = re.sub(r"_\d$", "", name)
        out[name] = m.group(1) if m else (base if base != name and base in names else name)
    return out


def _scan_autopet(d: Path, require_mask: bool) -> tuple[list[StudyRef], list[Problem]]:
    study_dirs = sorted(Path(root) for root, _, files in os.walk(d) if "SUV.nii.gz" in files)
    by_patient: dict[str, list[Path]] = {}
    for s in study_dirs:
        by_patient.setdefault(s.parent.name, []).append(s)
    refs, problems = [], []
    for patient in sorted(by_patient):
        for k, s in enumerate(sorted(by_patient[patient], key=str)):
            case_id = safe_id(patient) + (f"_{k + 1}" if k else "")
            ct = s / "CTres.nii.gz" if (s / "CTres.nii.gz").exists() else s / "CT.nii.gz"
            if not ct.exists():
                problems.append((case_id, f"{s}: no CTres.nii.gz (CT on the PET grid) or CT.nii.gz; add the CT"))
                continue
            paths = {"pet": str(s / "SUV.nii.gz"), "ct": str(ct)}
            if (s / "ORGANS.nii.gz").exists():
                paths["organs"] = str(s / "ORGANS.nii.gz")
            if (s / "SEG.nii.gz").exists():
                paths["mask"] = str(s / "SEG.nii.gz")
            elif require_mask:
                problems.append((case_id, f"{s}: no SEG.nii.gz (tumour mask); add it, or use the study for "
                                          f"prediction only (require_mask=False)"))
                continue
            refs.append(StudyRef(case_id, safe_id(patient), "autopet", paths))
    return refs, problems


def _channel_kind(name: str) -> str | None:
    n = str(name).lower()
    if re.search(r"pet|\bpt\b|suv", n):
        return "pet"
    if re.search(r"\bct\b|^ct", n):
        return "ct"
    return None


def _check_channel_names(d: Path, ct_channel: int, pet_channel: int) -> None:
    meta_path = d / "dataset.json"
    if not meta_path.exists():
        return
    try:
        names = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: cannot parse ({e}); fix or remove dataset.json") from None
    names = names.get("channel_names") or names.get("modality") or {}
    ct_kind, pet_kind = _channel_kind(names.get(str(ct_channel), "")), _channel_kind(names.get(str(pet_channel), ""))
    if ct_kind == "pet" or (pet_kind == "ct" and ct_kind != "ct"):
        raise DataError(f"{meta_path}: channel_names {names} contradict ct_channel={ct_channel}, "
                        f"pet_channel={pet_channel}; set --ct_channel / --pet_channel to match the files "
                        f"(autoPET III: CT = 0, PET = 1; the autoPET I baseline: PET = 0, CT = 1)")


def _scan_nnunet(d: Path, ct_channel: int, pet_channel: int, require_mask: bool):
    if d.name in ("imagesTr", "imagesTs"):
        d = d.parent
    if ct_channel == pet_channel:
        raise DataError(f"ct_channel and pet_channel are both {ct_channel}; they must differ")
    _check_channel_names(d, ct_channel, pet_channel)
    pattern = re.compile(r"^(.*)_(\d{4})\.nii(\.gz)?$")
    refs, problems = [], []
    for split in ("Tr", "Ts"):
        folder = d / f"images{split}"
        if not folder.is_dir():
            continue
        channels: dict[str, dict[int, Path]] = {}
        for f in sorted(folder.iterdir()):
            m = pattern.match(f.name)
            if m:
                channels.setdefault(m.group(1), {})[int(m.group(2))] = f
        patients = _patient_ids(sorted(channels))
        for case in sorted(channels):
            files, case_id = channels[case], safe_id(case)
            missing = [f"{case}_{c:04d}.nii.gz" for c in (ct_channel, pet_channel) if c not in files]
            if missing:
                problems.append((case_id, f"{folder}: missing {', '.join(missing)} (ct_channel={ct_channel}, "
                                          f"pet_channel={pet_channel}); add the file or fix the channel order"))
                continue
            paths = {"ct": str(files[ct_channel]), "pet": str(files[pet_channel])}
            label = _first_existing(d / f"labels{split}", case)
            organs = _first_existing(d / f"organs{split}", case)
            if organs is not None:
                paths["organs"] = str(organs)
            if label is not None:
                paths["mask"] = str(label)
            elif require_mask and split == "Tr":
                problems.append((case_id, f"{d / 'labelsTr' / (case + '.nii.gz')}: label missing; add it "
                                          f"or use the case for prediction only (require_mask=False)"))
                continue
            elif require_mask:
                log.info("%s: skipping unlabelled test case %s", folder, case)
                continue
            refs.append(StudyRef(case_id, safe_id(patients[case]), "nnunet", paths))
    return refs, problems


def _first_existing(folder: Path, case: str) -> Path | None:
    """<folder>/<case>.nii.gz or <case>.nii, whichever exists first; None if neither."""
    return next((p for p in (folder / f"{case}.nii.gz", folder / f"{case}.nii") if p.exists()), None)


def _scan_png(d: Path, require_mask: bool):
    cases = _png_cases(d)
    patients = _patient_ids([c.name for c in cases])
    refs, problems = [], []
    for c in cases:
        paths = {"ct": str(c / "ct"), "pet": str(c / "pet"), "case": str(c)}
        if (c / "organs").is_dir():
            paths["organs"] = str(c / "organs")
        if (c / "mask").is_dir():
            paths["mask"] = str(c / "mask")
        elif require_mask:
            problems.append((safe_id(c.name), f"{c}: no mask/ folder; add it or use require_mask=False"))
            continue
        refs.append(StudyRef(safe_id(c.name), safe_id(patients[c.name]), "png", paths))
    return refs, problems


def scan_studies(data_dir: str | os.PathLike, layout: str = "auto", ct_channel: int = 0,
                 pet_channel: int = 1, require_mask: bool = True) -> tuple[list[StudyRef], list[Problem]]:
    """Like `find_studies` but returns the structural problems instead of raising on them."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: data folder not found; pass --data_dir=<folder with the studies>")
    if layout == "auto":
        layout = detect_layout(d)
    if layout == "autopet":
        refs, problems = _scan_autopet(d, require_mask)
    elif layout == "nnunet":
        refs, problems = _scan_nnunet(d, ct_channel, pet_channel, require_mask)
    elif layout == "png":
        refs, problems = _scan_png(d, require_mask)
    elif layout == "dicom":
        refs, problems = scan_dicom(d, require_mask)
    else:
        raise DataError(f"unknown layout {layout!r}; use one of auto, {', '.join(LAYOUTS)}")
    seen: dict[str, StudyRef] = {}
    for r in refs:
        if r.case_id in seen:
            problems.append((r.case_id, f"two studies map to case id {r.case_id}: {seen[r.case_id].paths} "
                                        f"and {r.paths}; rename one of the folders"))
        seen[r.case_id] = r
    return sorted(refs, key=lambda r: r.case_id), problems


def find_studies(data_dir: str | os.PathLike, layout: str = "auto", ct_channel: int = 0,
                 pet_channel: int = 1, require_mask: bool = True) -> list[StudyRef]:
    """All studies below `data_dir`, sorted by case_id; nothing is read beyond headers (DICOM).

    Raises one DataError listing every structural problem (missing SEG, missing channel, a DICOM
    study without a PET series, ...); `python -m data.check` reports them with the load errors.
    """
    refs, problems = scan_studies(data_dir, layout, ct_channel, pet_channel, require_mask)
    if problems:
        lines = [f"  {where}: {msg}" for where, msg in problems[:20]]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {data_dir}:\n" + "\n".join(lines) + more
                        + f"\nrun `python -m data.check {data_dir}` for a full report")
    if not refs:
        raise DataError(f"{data_dir}: no studies found (layout {layout}); check the folder")
    return refs


# ----------------------------------------------------------------------------- readers

def _load_nifti_study(ref: StudyRef, resample: bool) -> Study:
    ct, ct_affine = read_nifti(ref.paths["ct"])
    pet, pet_affine = read_nifti(ref.paths["pet"])
    return assemble_study(ct=ct, ct_affine=ct_affine, ct_path=ref.paths["ct"], pet=pet, pet_affine=pet_affine,
                          pet_path=ref.paths["pet"], **read_label_volumes(ref.paths),
                          case_id=ref.case_id, patient_id=ref.patient_id,
                          source=str(Path(ref.paths["pet"]).parent), resample=resample)


def load_study(ref_or_path: StudyRef | str | os.PathLike, resample: bool = False) -> Study:
    """Read one study and validate it (shapes, grids, binary mask, no NaN/inf).

    `ref_or_path`: a StudyRef from `find_studies`, or a folder holding exactly one study (an
    autoPET study folder, a PNG case folder, a DICOM study folder).
    resample: put a CT / mask that lies on another grid onto the PET grid (trilinear CT, -1000 HU
    outside; nearest mask). Without it such a study is refused with a DataError.
    Returns a Study on the PET grid (ct float32 HU, pet float32 SUV, mask uint8 or None).
    """
    ref = ref_or_path
    if not isinstance(ref, StudyRef):
        refs = find_studies(ref_or_path, require_mask=False)
        if len(refs) != 1:
            raise DataError(f"{ref_or_path}: holds {len(refs)} studies; pass one study folder or use find_studies()")
        ref = refs[0]
    if ref.layout in ("autopet", "nnunet"):
        return _load_nifti_study(ref, resample)
    if ref.layout == "png":
        return _load_png_study(ref, resample)
    if ref.layout == "dicom":
        return load_dicom_study(ref, resample)
    raise DataError(f"unknown layout {ref.layout!r} in {ref}; use one of {', '.join(LAYOUTS)}")


# ----------------------------------------------------------------------------- PNG slices

PNG_CT_OFFSET = 1024.0   # stored = HU + 1024 (so -1024 HU -> 0), 1 HU steps, 16-bit
PNG_SUV_SCALE = 1000.0   # stored = SUV * 1000, 0.001 SUV steps, max 65.535, 16-bit


def write_png_study(study: Study, case_dir: str | os.PathLike) -> Path:
    """Write a study as PNG slice folders (the "png" layout), for exports and tests.

    <case_dir>/ct/<z>.png    uint16, stored = round(HU + 1024), clipped to [0, 65535]
    <case_dir>/pet/<z>.png   uint16, stored = round(SUV * 1000), clipped to [0, 65535]
    <case_dir>/mask/<z>.png  uint8, 0 = background, 255 = tumour (visible in any viewer)
    <case_dir>/organs/<z>.png  uint8 organ labels as they are (0..255), when study.organs is set
    <case_dir>/spacing.json  {"spacing": [sx, sy, sz]} in mm
    z = 0..Z-1 without padding; pixel [i, j] of slice z is voxel (i, j, z): rows are the X axis.
    Lossy: 1 HU and 0.001 SUV steps; SUV above 65.535 and HU above 64511 are clipped.
    """
    from PIL import Image

    case_dir = Path(case_dir)
    volumes = {"ct": np.clip(np.rint(study.ct + PNG_CT_OFFSET), 0, 65535).astype(np.uint16),
               "pet": np.clip(np.rint(study.pet * PNG_SUV_SCALE), 0, 65535).astype(np.uint16)}
    if study.mask is not None:
        volumes["mask"] = (study.mask > 0).astype(np.uint8) * 255
    if study.organs is not None:
        volumes["organs"] = np.asarray(study.organs, np.uint8)
    for name, vol in volumes.items():
        (case_dir / name).mkdir(parents=True, exist_ok=True)
        for z in range(vol.shape[2]):
            Image.fromarray(np.ascontiguousarray(vol[:, :, z])).save(case_dir / name / f"{z}.png")
    (case_dir / "spacing.json").write_text(json.dumps({"spacing": [float(s) for s in study.spacing]}))
    return case_dir


def _read_png_stack(folder: Path, case_id: str, expect_16bit: bool) -> tuple[np.ndarray, list[int]]:
    from PIL import Image

    files = {}
    for f in folder.glob("*.png"):
        if not f.stem.isdigit():
            raise DataError(f"{f}: PNG slice names must be the slice index (0.png, 1.png, ...); rename it")
        files[int(f.stem)] = f
    indices = sorted(files)
    if indices != list(range(len(indices))):
        gaps = sorted(set(range(max(indices) + 1)) - set(indices))[:10] if indices else []
        raise DataError(f"{folder}: slice indices of {case_id} are not 0..{len(indices) - 1} (missing {gaps}); "
                        f"every slice must be present")
    slices = []
    for z in indices:
        try:
            with Image.open(files[z]) as im:
                if expect_16bit and im.mode not in ("I;16", "I;16B", "I"):
                    raise DataError(f"{files[z]}: PNG mode {im.mode}, expected 16-bit grayscale "
                                    f"(see data.io.write_png_study for the encoding)")
                slices.append(np.asarray(im).astype(np.float32))
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{files[z]}: cannot read ({type(e).__name__}: {e}); re-export the slice") from None
        if slices[-1].ndim != 2 or slices[-1].shape != slices[0].shape:
            raise DataError(f"{files[z]}: slice shape {slices[-1].shape} differs from {slices[0].shape} "
                            f"(or is not grayscale); all slices of a study must match")
    return np.stack(slices, axis=2), indices  # (X, Y, Z)


def _load_png_study(ref: StudyRef, resample: bool) -> Study:
    case_dir = Path(ref.paths["case"])
    spacing = (1.0, 1.0, 1.0)
    if (case_dir / "spacing.json").exists():
        try:
            spacing = tuple(float(s) for s in json.loads((case_dir / "spacing.json").read_text())["spacing"])
            assert len(spacing) == 3 and min(spacing) > 0
        except Exception:
            raise DataError(f"{case_dir / 'spacing.json'}: expected {{\"spacing\": [sx, sy, sz]}} in mm, "
                            f"all positive; fix the file") from None
    else:
        log.warning("%s: no spacing.json, assuming 1 mm voxels (volumes in ml will be wrong otherwise)", case_dir)
    affine = np.diag([*spacing, 1.0])
    ct, _ = _read_png_stack(Path(ref.paths["ct"]), ref.case_id, expect_16bit=True)
    pet, _ = _read_png_stack(Path(ref.paths["pet"]), ref.case_id, expect_16bit=True)
    mask = None
    if "mask" in ref.paths:
        mask, _ = _read_png_stack(Path(ref.paths["mask"]), ref.case_id, expect_16bit=False)
        if set(np.unique(mask).tolist()) <= {0.0, 255.0}:
            mask = mask / 255.0  # the encoding write_png_study uses; 0/1 masks are accepted as they are
    organs = None
    if "organs" in ref.paths:  # integer labels as stored (8-bit; 16-bit values above 255 are refused)
        organs, _ = _read_png_stack(Path(ref.paths["organs"]), ref.case_id, expect_16bit=False)
    return assemble_study(ct=ct - PNG_CT_OFFSET, ct_affine=affine, ct_path=ref.paths["ct"],
                          pet=pet / PNG_SUV_SCALE, pet_affine=affine, pet_path=ref.paths["pet"], mask=mask,
                          mask_affine=affine, mask_path=ref.paths.get("mask"), organs=organs,
                          organs_affine=affine, organs_path=ref.paths.get("organs"), case_id=ref.case_id,
                          patient_id=ref.patient_id, source=str(case_dir), resample=resample)
