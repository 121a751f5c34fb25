"""Organ label map of the phantom's ORGANS volumes, and the tissue -> organ lookup that builds it.

    from data.organs import ORGAN_LABELS, N_ORGAN_CLASSES, organ_labels
    organs = organ_labels(rendered.tissue)      # uint8 (X, Y, Z), values in ORGAN_LABELS

The map groups the phantom's tissue ids (data/_anatomy.py) into the structures an organ
segmenter (e.g. TotalSegmentator) would give and that carry physiological uptake, so that an
auxiliary organ head (LesionTracer, the autoPET III winner: Rokuss et al. 2024,
arXiv:2409.09478) can learn where the non-tumour hot spots are. Label 0 holds everything
else: air, subcutaneous and visceral fat, the spinal canal, and the LESION voxels, so that
ORGANS and SEG never overlap (a lesion in the liver is background here, not liver).

Real data: a user's own organ volume (ORGANS.nii.gz, e.g. TotalSegmentator output) may use any
integer labels 0..255; they are used as they are, and the number of organ classes
(max label + 1) must be given to the dataset, the model and the loss consistently.
"""
from __future__ import annotations

import numpy as np

from data import _anatomy as A

# label -> name (the label map of the phantom's ORGANS.nii.gz / organsTr/<case>.nii.gz)
ORGAN_LABELS: dict[int, str] = {
    0: "background",       # air, fat, visceral fat, spinal canal, lesions
    1: "brain",            # grey + white matter
    2: "heart",            # myocardium + blood pool
    3: "kidney",           # cortex
    4: "renal_pelvis",
    5: "ureter",           # tube and its hot boluses
    6: "bladder",
    7: "liver",
    8: "spleen",
    9: "salivary_glands",  # parotid, submandibular glands and tonsils
    10: "lung",
    11: "bone",            # cortex (skull included) + marrow
    12: "brown_fat",
    13: "bowel",           # loops and their air pockets
    14: "aorta",
    15: "muscle",          # muscle layer, thighs and the optional focal muscle uptake
}
N_ORGAN_CLASSES = len(ORGAN_LABELS)  # 16: labels 0..15, the aux head's number of classes

# tissue ids (data._anatomy) of each organ label; tissues not listed are background (0)
ORGAN_TISSUES: dict[int, tuple[int, ...]] = {
    1: (A.BRAIN_GM, A.BRAIN_WM), 2: (A.MYOCARDIUM, A.BLOOD), 3: (A.KIDNEY,),
    4: (A.RENAL_PELVIS,), 5: (A.URETER, A.BOLUS), 6: (A.BLADDER,), 7: (A.LIVER,),
    8: (A.SPLEEN,), 9: (A.GLAND,), 10: (A.LUNG,), 11: (A.CORTEX, A.MARROW),
    12: (A.BROWN_FAT,), 13: (A.BOWEL, A.BOWEL_AIR), 14: (A.AORTA,),
    15: (A.MUSCLE, A.MUSCLE_FOCUS),
}


def _lookup_table() -> np.ndarray:
    """uint8 (256,): lut[tissue id] = organ label (0 for tissues in no organ)."""
    lut = np.zeros(256, np.uint8)
    for label, tissues in ORGAN_TISSUES.items():
        lut[list(tissues)] = label
    return lut


TISSUE_TO_ORGAN = _lookup_table()


def organ_labels(tissue: np.ndarray) -> np.ndarray:
    """Organ label volume of a rendered tissue map: uint8, same shape, organ = TISSUE_TO_ORGAN[tissue]."""
    return TISSUE_TO_ORGAN[np.asarray(tissue, np.uint8)]
