"""Auxiliary training targets that need no organ labels (numpy only).

    hot = uptake_target(study.pet, study.mask, threshold=UPTAKE_SUV)      # uint8 (X, Y, Z) in {0, 1}
    suv = suv_from_channel(image[z, 1], suv_max=20.0)                     # from the cached PET channel
    hot_z = uptake_target(suv, mask[z], UPTAKE_SUV)                       # one cached slice

The "physiological uptake" class: voxels brighter than a fixed SUV that are not tumour. This is
the idea of the DEEP-PSMA challenge's nnU-Net baseline, which derived such a class on the fly
from an SUV threshold and the tumour label, so that the network learns to tell hot normal
tissue from hot tumour without any organ segmentation.

Threshold (UPTAKE_SUV = 3.0), measured on the phantom with bench/uptake_threshold.py (20 `demo`
studies, seed 0): of the non-tumour voxels above the threshold, the share that lies in a hot
physiological structure (brain, heart, kidney cortex, renal pelvis, bladder, ureter boluses,
brown fat, salivary glands, focal muscle uptake) or within 2 voxels of one (spill-in):
    SUV > 2.0: 93.6 % (6.3 % elsewhere, mostly liver noise)
    SUV > 2.5: 99.8 %          SUV > 3.0: 99.9 %          SUV > 4.0: 99.9 %
and the share of each moderately hot organ that the target covers (kidney cortex / glands /
myocardium): 75 / 53 / 62 % at 2.5, 47 / 31 / 43 % at 3.0, 6 / 6 / 31 % at 4.0. On the phantom
2.5 and 3.0 are equally clean (its liver is kept below SUV 1.85 by design); 3.0 is the default
because real FDG livers reach SUV 2-3.5 (mean ~2), so 2.5 would put liver noise into the class
on real data, while 4.0 drops most of the kidney cortex and the glands.
"""
from __future__ import annotations

import numpy as np

UPTAKE_SUV = 3.0  # default threshold of the uptake target (module docstring)


def uptake_target(suv: np.ndarray, mask: np.ndarray | None, threshold: float = UPTAKE_SUV) -> np.ndarray:
    """Physiological-uptake target: 1 where SUV > threshold and not tumour, else 0.

        target = (suv > threshold) & (mask == 0)            (strictly greater)

    suv: SUV of any shape (a volume (X, Y, Z) or a slice (X, Y)); mask: the tumour mask of the
    same shape (nonzero = tumour), or None (unlabelled: every hot voxel counts).
    Returns uint8 of suv's shape in {0, 1}.
    """
    suv = np.asarray(suv)
    hot = suv > threshold
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != suv.shape:
            raise ValueError(f"uptake_target: suv {suv.shape} and mask {mask.shape} differ in shape")
        hot &= mask == 0
    return hot.astype(np.uint8)


def suv_from_channel(channel: np.ndarray, suv_max: float) -> np.ndarray:
    """SUV from the cached PET channel, the inverse of ch1 = 2 * clip(SUV, 0, suv_max) / suv_max - 1:

        SUV = (ch1 + 1) * suv_max / 2        (float32; values above suv_max come back as suv_max)

    Exact up to the float16 storage (~0.01 SUV at suv_max = 20), so a threshold must lie below
    suv_max, and voxels within ~0.01 SUV of it may fall on either side.
    """
    return (np.asarray(channel, np.float32) + np.float32(1.0)) * np.float32(suv_max / 2.0)


def uptake_from_channel(channel: np.ndarray, mask: np.ndarray | None, suv_max: float,
                        threshold: float = UPTAKE_SUV) -> np.ndarray:
    """`uptake_target` on the cached, normalised PET channel (see `suv_from_channel`)."""
    if not 0 < threshold < suv_max:
        raise ValueError(f"uptake threshold {threshold} must lie in (0, suv_max={suv_max}): the "
                         f"cached PET is clipped at suv_max")
    return uptake_target(suv_from_channel(channel, suv_max), mask, threshold)
