"""Geometry and validation shared by every reader (NIfTI, nnU-Net, DICOM, PNG): one grid test,
resampling onto the PET grid, exact reorientation, NIfTI reading, and `assemble_study`, which
checks CT / PET / mask / organ labels and puts them on the PET grid.

    ct_on_pet = resample_to_grid(ct, ct_affine, pet_affine, pet.shape, order=1, cval=-1000.0)
    study = assemble_study(ct=ct, ct_affine=..., pet=pet, pet_affine=..., mask=mask, ...)

The readers (`data/io.py` dispatches, `data/dicom.py` reads DICOM) import this module; it imports
neither of them, so the readers form no cycle.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .study import DataError, Study

log = logging.getLogger(__name__)

AFFINE_TOL_MM = 1e-3  # CT / PET / mask grids that differ by less are the same grid


# ----------------------------------------------------------------------------- geometry

def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis = the norms of the affine's first three columns."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def same_grid(shape_a, affine_a, shape_b, affine_b, tol: float = AFFINE_TOL_MM) -> bool:
    """True when shapes are equal and every affine entry agrees within `tol` mm."""
    return tuple(shape_a) == tuple(shape_b) and bool(np.allclose(affine_a, affine_b, rtol=0, atol=tol))


def resample_to_grid(array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                     dst_shape: tuple[int, int, int], order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Sample `array` (on `src_affine`) at the voxel centres of the grid (`dst_affine`, `dst_shape`).

    out[i, j, k] = array at src voxel  inv(src_affine) @ dst_affine @ (i, j, k, 1)
    with `order` 1 = trilinear (images), 0 = nearest (masks). A source voxel covers
    [-0.5, n - 0.5] in voxel units: points inside that box are sampled (edge-clamped in the
    outer half voxel), points outside get `cval` (-1000 HU for CT: air). Done one output slice
    at a time so memory stays at one slice of coordinates. Returns float32 (X', Y', Z').
    """
    from scipy.ndimage import map_coordinates  # scipy only when something is resampled

    dst_to_src = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
    rot, shift = dst_to_src[:3, :3], dst_to_src[:3, 3]
    src = np.asarray(array, np.float32)
    ii, jj = np.meshgrid(np.arange(dst_shape[0]), np.arange(dst_shape[1]), indexing="ij")
    upper = np.array(src.shape, np.float64)[:, None, None] - 0.5
    out = np.empty(dst_shape, np.float32)
    for k in range(dst_shape[2]):
        coords = np.einsum("ab,bxy->axy", rot, np.stack([ii, jj, np.full_like(ii, k)]).astype(np.float64))
        coords += shift[:, None, None]  # (3, X', Y') source voxel coordinates
        inside = np.all((coords >= -0.5) & (coords <= upper), axis=0)
        values = map_coordinates(src, coords, order=order, mode="nearest")
        out[:, :, k] = np.where(inside, values, cval)
    return out


def inplane_grid(shape: tuple[int, int, int], affine: np.ndarray, target_spacing: float
                 ) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid of in-plane spacing `target_spacing` (mm, axes 0 and 1) over the same field of
    view: (shape', affine'), z (axis 2) untouched.

    Per in-plane axis with n voxels of spacing s: n' = ceil(n s / t) voxels of spacing t, centred
    on the same point (the field of view's centre), so the new grid covers every old voxel
    centre: new index j sits at old index i(j) = (n - 1) / 2 + (j - (n' - 1) / 2) t / s.
    affine' = affine @ M with M the (4, 4) map new index -> old index:
    diag(t / s_x, t / s_y, 1) and the offsets (n - 1) / 2 - (n' - 1) / 2 * t / s.
    """
    affine = np.asarray(affine, np.float64)
    spacing = spacing_from_affine(affine)
    t = float(target_spacing)
    new_shape, m = list(shape), np.eye(4)
    for axis in (0, 1):
        n, s = shape[axis], spacing[axis]
        new_n = max(1, int(np.ceil(n * s / t - 1e-6)))  # 1e-6: float noise in n s / t
        new_shape[axis] = new_n
        m[axis, axis] = t / s
        m[axis, 3] = (n - 1) / 2.0 - (new_n - 1) / 2.0 * t / s
    return tuple(int(v) for v in new_shape), affine @ m


def _reorient_exact(array: np.ndarray, affine: np.ndarray, ref_shape, ref_affine) -> np.ndarray | None:
    """The array on the reference grid if the two grids differ only by axis flips / permutations
    (e.g. a converter that stored rows flipped): lossless, no interpolation. Else None."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), io_orientation(ref_affine))
    new_affine = np.asarray(affine) @ inv_ornt_aff(transform, array.shape)
    new = apply_orientation(array, transform)
    if same_grid(new.shape, new_affine, ref_shape, ref_affine):
        return np.ascontiguousarray(new)
    return None


# ----------------------------------------------------------------------------- validation

def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI image -> (float32 (X, Y, Z) with scl_slope/inter applied, float64 (4, 4) affine)."""
    path = str(path)
    try:
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data folder or run `python -m data.check`") from None
    except Exception as e:  # nibabel / gzip / zlib raise many types for one cause: a damaged file
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e}); the file is corrupt "
                        f"or not NIfTI - re-download or re-export it") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D image, got shape {data.shape}; save one volume per file")
    return data, np.asarray(img.affine, np.float64)


def check_finite(array: np.ndarray, path: str, what: str, case_id: str) -> None:
    """Refuse NaN / inf voxels (they poison normalisation and every loss downstream)."""
    n_bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise DataError(f"{path}: {n_bad} NaN/inf voxels in the {what} of study {case_id}; "
                        f"fix the image (e.g. replace them by a valid value) and save it again")


def check_binary(mask: np.ndarray, path: str, case_id: str) -> np.ndarray:
    """Return the mask as uint8 {0, 1}; anything else (255, labels 2..n, 0.5, NaN) is refused.

    Strict on purpose: a multi-label or soft mask read as "> 0" silently changes the task.
    """
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        values = np.unique(np.concatenate([np.unique(mask[bad])[:8], np.unique(mask[~bad])]))
        raise DataError(f"{path}: the mask of study {case_id} is not binary: values {values.tolist()}; "
                        f"expected 0 (background) and 1 (tumour) - binarise it (e.g. mask > 0) and save it again")
    return mask.astype(np.uint8)


def check_labels(labels: np.ndarray, path: str, case_id: str) -> np.ndarray:
    """Return an organ label volume as uint8; refuse values that are not integers in 0..255.

    A float-valued file (a resampled, interpolated label map) or NaN would silently turn into
    wrong classes, so it is refused with the file name and the fix.
    """
    labels = np.asarray(labels)
    bad = ~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 0) | (labels > 255)
    if bad.any():
        values = np.unique(labels[bad])[:8]
        raise DataError(f"{path}: the organ labels of study {case_id} are not integers in 0..255 "
                        f"({int(bad.sum())} voxel(s), e.g. {values.tolist()}); save integer labels "
                        f"(uint8), resampled with nearest-neighbour interpolation")
    return labels.astype(np.uint8)


def _to_pet_grid(array, affine, path, what, pet, pet_affine, pet_path, case_id, resample, order, cval):
    """`array` on the PET grid: unchanged if the grids agree, exactly reoriented if they differ by
    flips/permutations, resampled if `resample`, else a DataError that says what differs."""
    if same_grid(array.shape, affine, pet.shape, pet_affine):
        return array
    exact = _reorient_exact(array, affine, pet.shape, pet_affine)
    if exact is not None:
        log.info("%s: reoriented the %s of %s to the PET axis order", path, what, case_id)
        return exact
    if resample:
        log.info("%s: resampling the %s of %s onto the PET grid", path, what, case_id)
        return resample_to_grid(array, affine, pet_affine, pet.shape, order=order, cval=cval)
    if array.shape != pet.shape:
        diff = f"shapes differ: {tuple(array.shape)} vs {tuple(pet.shape)}"
    else:
        worst = float(np.abs(np.asarray(affine) - np.asarray(pet_affine)).max())
        spacings = [np.round(spacing_from_affine(a), 4).tolist() for a in (affine, pet_affine)]
        diff = f"grids differ (affines differ by up to {worst:.4g} mm; spacing {spacings[0]} vs {spacings[1]})"
    raise DataError(f"{what} and PET {diff} in study {case_id} ({path} vs {pet_path}); "
                    f"resample the {what} to the PET grid or pass --resample=True")


def assemble_study(*, ct, ct_affine, ct_path, pet, pet_affine, pet_path, mask=None, mask_affine=None,
                   mask_path=None, organs=None, organs_affine=None, organs_path=None, case_id,
                   patient_id, source, resample=False) -> Study:
    """Validate CT / PET / mask / organ labels and put them on the PET grid. Shared by every reader.

    The mask and the organ labels take the same route: exact reorientation when the grids differ
    only by axis flips / permutations, nearest-neighbour resampling with `resample`, else a
    DataError.
    """
    check_finite(pet, pet_path, "PET", case_id)
    check_finite(ct, ct_path, "CT", case_id)
    ct = _to_pet_grid(ct, ct_affine, ct_path, "CT", pet, pet_affine, pet_path, case_id, resample, 1, -1000.0)
    if mask is not None:
        mask = check_binary(mask, mask_path, case_id)
        mask = _to_pet_grid(mask, mask_affine, mask_path, "mask", pet, pet_affine, pet_path, case_id,
                            resample, 0, 0.0).astype(np.uint8)
    if organs is not None:
        organs = check_labels(organs, organs_path, case_id)
        organs = _to_pet_grid(organs, organs_affine, organs_path, "organ labels", pet, pet_affine,
                              pet_path, case_id, resample, 0, 0.0)
        organs = np.ascontiguousarray(organs, np.uint8)
    return Study(ct=np.ascontiguousarray(ct, np.float32), pet=np.ascontiguousarray(pet, np.float32),
                 mask=mask, spacing=spacing_from_affine(pet_affine),
                 affine=np.asarray(pet_affine, np.float64), case_id=case_id, patient_id=patient_id,
                 source=source, organs=organs)


def save_mask_nifti(mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Binary (X, Y, Z) mask -> uint8 NIfTI with the study's affine (atomic: temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), np.asarray(affine, np.float64))
    image.set_qform(image.affine, code=1)  # scanner coordinates, so viewers align with the PET
    image.set_sform(image.affine, code=1)
    tmp = path.with_name(f".tmp-{path.name}")  # keeps the .nii.gz suffix nibabel reads
    nib.save(image, tmp)
    os.replace(tmp, path)


def read_label_volumes(paths: dict) -> dict:
    """The optional label volumes of a study's files: {"mask", "mask_affine", "organs",
    "organs_affine", "mask_path", "organs_path"} (None where a file is absent), ready to pass on
    to `assemble_study`. Shared by the NIfTI and DICOM readers."""
    out = {}
    for role in ("mask", "organs"):
        array, affine = read_nifti(paths[role]) if role in paths else (None, None)
        out.update({role: array, f"{role}_affine": affine, f"{role}_path": paths.get(role)})
    return out
