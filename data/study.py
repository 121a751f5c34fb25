"""The in-memory study and the error every data reader raises.

A `Study` is one PET/CT examination on one voxel grid (the PET grid): CT in HU, PET in SUV,
an optional binary tumour mask, optional organ labels, and the geometry that maps voxels to
scanner coordinates.
A `StudyRef` is what `find_studies` returns: where a study lives, before anything is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A problem with the user's data: the message names the file and what to do."""

    user_error = True  # runtime.exit_on_user_error prints it without a traceback


@dataclass
class Study:
    """One PET/CT study on the PET grid.

    ct:         float32 (X, Y, Z), Hounsfield units.
    pet:        float32 (X, Y, Z), SUV body weight (g/ml).
    mask:       uint8 (X, Y, Z) in {0, 1}, or None when the study is unlabelled.
    spacing:    voxel size in mm, in array-axis order (X, Y, Z).
    affine:     float64 (4, 4) voxel index -> world mm (RAS+, nibabel convention).
    case_id:    file-name safe id that starts with the patient folder's name.
    patient_id: studies with the same patient_id are never split across train/val/test.
    source:     where the study was read from (folder or file), for messages and caches.
    organs:     uint8 (X, Y, Z) integer organ labels 0..255 (0 = background), or None when the
                study has no organ label volume. The phantom's map is data/organs.py
                ORGAN_LABELS; a user's own file (e.g. TotalSegmentator output saved as
                ORGANS.nii.gz) keeps its own label values.
    Axis 2 (Z) is the axial slice axis.
    """

    ct: np.ndarray
    pet: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    case_id: str
    patient_id: str
    source: str
    organs: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pet.shape)

    @property
    def has_tumor(self) -> bool:
        return self.mask is not None and bool(self.mask.any())


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives. `layout` is one of "autopet", "nnunet", "dicom", "png".

    paths: role -> existing file or folder, e.g. {"ct": ..., "pet": ..., "mask": ..., "organs": ...}
      (no "mask" key when the study is unlabelled, no "organs" key without organ labels). For DICOM, "ct"/"pet" are the folders that
      hold each series and "study" the study folder.
    series_uids: DICOM only, {"ct": SeriesInstanceUID, "pet": SeriesInstanceUID}, so that a
      folder holding several series is read unambiguously.
    """

    case_id: str
    patient_id: str
    layout: str
    paths: dict[str, str]
    series_uids: dict[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:  # the dict fields are not hashable; refs are still usable as keys
        return hash((self.case_id, self.layout, tuple(sorted(self.paths.items()))))


def safe_id(name: str) -> str:
    """File-name safe id: every character outside [A-Za-z0-9._-] becomes '_' (runs collapsed)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "case"
