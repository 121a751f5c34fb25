"""PET quantification of a segmentation (MTV, SUVmax/mean/peak, TLG, Dmax) and its agreement.

Per study, for a binary mask on the study's ORIGINAL SUV volume (float32 (X, Y, Z), not the
training cache, which is clipped at `suv_max`), spacing in mm in array-axis order:

    quantify(suv, mask, spacing)
        -> {"suvmax", "suvmean", "suvpeak", "mtv_ml", "tlg", "dmax_mm"}
    study_columns(suv, pred, ref, spacing)
        -> the same for prediction and reference: STUDY_COLUMNS, `<name>_pred`, `<name>_ref`
    lesion_table(suv, ref, spacing, detected, case_id=...) -> one row per reference lesion
    write_lesion_csv(rows, path)  -> lesions.csv of all studies (atomic)

Over a cohort (tumour studies only; pairs with a NaN dropped, `n` reported):

    agreement(pred, ref)
        -> {"n", "n_dropped", "bias", "sd_diff", "loa_low", "loa_high", "icc_2_1", "spearman"}
    cohort_agreement(rows)  -> {"mtv_ml": agreement, "tlg": ..., "suvmax": ...}
                               (for summary["agreement"])
    save_agreement_plots(rows, out_dir) -> [Bland-Altman PNG, predicted-vs-reference PNG]

Definitions and sources: docs/evaluation.md, "PET quantification and the report". numpy and
scipy only (no torch, no project module): importable and testable on its own.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy import ndimage

# 18-connectivity (faces + edges), the lesion definition of test.py and the autoPET evaluation.
CONNECTIVITY_18 = ndimage.generate_binary_structure(3, 2)

# PERCIST 1.0 (Wahl et al. 2009): SUVpeak is the mean SUV of a 1 ml sphere; a 1 ml sphere has a
# radius of (3 * 1000 / (4 pi))^(1/3) = 6.2035 mm, rounded to 6.2 mm as the criteria state it.
SUVPEAK_RADIUS_MM = 6.2
# sphere_means_at: convolve the whole (grown) bounding box when the mask fills more than
# 1/DENSE_ABOVE_FILL of it, else gather the sphere at the mask's voxels only (the two
# cost the same at a fill of about 1/3, measured on random masks)
DENSE_ABOVE_FILL = 3

QUANTITIES = ("suvmax", "suvmean", "suvpeak", "mtv_ml", "tlg", "dmax_mm")
# study_columns() keys, in this order: suvmax_pred, suvmax_ref, suvmean_pred, ...
STUDY_COLUMNS = tuple(f"{q}_{side}" for q in QUANTITIES for side in ("pred", "ref"))
LESION_COLUMNS = ("case_id", "lesion_id", "volume_ml", "suvmax", "suvmean", "suvpeak", "tlg",
                  "centroid_x", "centroid_y", "centroid_z", "detected")
# quantities whose agreement cohort_agreement() reports by default (summary["agreement"])
AGREEMENT_QUANTITIES = ("mtv_ml", "tlg", "suvmax")
AGREEMENT_LABELS = {"mtv_ml": "MTV (ml)", "tlg": "TLG (SUV·ml)", "suvmax": "SUVmax",
                    "suvmean": "SUVmean", "suvpeak": "SUVpeak", "dmax_mm": "Dmax (mm)"}
# file names save_agreement_plots() writes (report.py shows them when present)
BLAND_ALTMAN_PNG = "agreement_bland_altman.png"
SCATTER_PNG = "agreement_scatter.png"


# ---------------------------------------------------------------------------------------------
# inputs


def _spacing(spacing: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} must be {ndim} positive voxel sizes in mm in "
                         f"array-axis order (nibabel: header.get_zooms()[:3])")
    return spacing


def _volumes(suv: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(SUV float32, mask bool), both 3-D of one shape, or a ValueError saying what differs."""
    suv = np.asarray(suv)
    mask = np.asarray(mask) != 0
    if suv.ndim != 3 or suv.shape != mask.shape:
        raise ValueError(f"SUV {suv.shape} and mask {mask.shape} must be 3-D arrays of one shape "
                         f"(X, Y, Z); quantify on the study's own grid, not the resampled cache")
    return suv.astype(np.float32, copy=False), mask


def voxel_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in ml: prod(spacing) / 1000 (spacing in mm)."""
    return float(np.prod(_spacing(spacing))) / 1000.0


# ---------------------------------------------------------------------------------------------
# SUVpeak: the 1 ml sphere


def sphere_kernel(spacing: Sequence[float], radius_mm: float = SUVPEAK_RADIUS_MM) -> np.ndarray:
    """Boolean (2h_x+1, 2h_y+1, 2h_z+1) kernel of the voxels whose centres lie within
    `radius_mm` of the centre voxel's centre: offsets (i, j, k) with
        (i s_x)^2 + (j s_y)^2 + (k s_z)^2 <= r^2,   h_a = floor(r / s_a).
    Anisotropic spacing gives an ellipsoid in voxels (a sphere in mm): for (2, 2, 3) mm and
    r = 6.2 mm, 7 x 7 x 5 voxels of which 73 are inside (tested against a hand count)."""
    spacing = _spacing(spacing)
    half = [int(math.floor(radius_mm / s)) for s in spacing]
    axes = [np.arange(-h, h + 1, dtype=np.float64) * s for h, s in zip(half, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    # a tiny tolerance, so that a voxel centre exactly on the sphere counts despite rounding
    return x ** 2 + y ** 2 + z ** 2 <= radius_mm ** 2 * (1 + 1e-12)


def _grown_bbox(mask: np.ndarray, margin: Sequence[int]) -> tuple[tuple[slice, ...], bool]:
    """Bounding box of `mask` grown by margin[a] voxels on axis a, clipped to the volume, and
    whether any side was clipped (the sphere can then reach outside the image)."""
    box, clipped = [], False
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(hits[0]) - margin[axis], int(hits[-1]) + 1 + margin[axis]
        clipped |= lo < 0 or hi > mask.shape[axis]
        box.append(slice(max(lo, 0), min(hi, mask.shape[axis])))
    return tuple(box), clipped


def local_sphere_mean(suv: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                      radius_mm: float = SUVPEAK_RADIUS_MM) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Dense map of the sphere means: the mean SUV of the sphere around every voxel of the
    bounding box of `mask` grown by the kernel's half-size, counting only voxels inside the
    image,
        mean(v) = sum_{u in S(v) ∩ image} SUV(u) / |S(v) ∩ image|
    computed as (SUV * K) / (1 * K) with K = sphere_kernel and zero outside the image (scipy
    ndimage.correlate, mode="constant", cval=0; K is symmetric: correlation = convolution).
    Returns (the box's means, float64; the box's slices into the volume). Exact at the mask's
    voxels (every in-image neighbour lies in the box), not at the box's rim. The count is
    the constant K.sum() when the grown box lies inside the image (no second convolution).

    `sphere_means_at` uses this for large masks and otherwise evaluates the same sums only at
    the mask's voxels (identical values, tested): the box of lesions spread over the body is
    most of the body, while the lesions are a few thousand voxels."""
    kernel = sphere_kernel(spacing, radius_mm)
    if not mask.any():
        raise ValueError("local_sphere_mean needs a non-empty mask (its box is the mask's)")
    box, clipped = _grown_bbox(mask, [n // 2 for n in kernel.shape])
    weights = kernel.astype(np.float64)
    total = ndimage.correlate(np.asarray(suv[box], dtype=np.float32), weights,
                              output=np.float64, mode="constant", cval=0.0)
    if clipped:
        total /= ndimage.correlate(np.ones(total.shape, np.float32), weights, output=np.float64,
                                   mode="constant", cval=0.0)
    else:  # the box lies inside the image: every mask voxel sees the whole kernel
        total /= float(kernel.sum())
    return total, box


def sphere_means_at(suv: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                    radius_mm: float = SUVPEAK_RADIUS_MM) -> np.ndarray:
    """The sphere mean of `local_sphere_mean` at each voxel of `mask` only: (M,) float64 for
    the M mask voxels in np.nonzero(mask) order (C order of the voxel indices). The same
    convolution, evaluated where it is used: for each of the kernel's K offsets, the SUV of
    the shifted voxels is gathered and summed (cost M * K, against box size * K densely) and
    the in-image neighbours are counted (the count is K everywhere when the box grown by the
    kernel did not reach the image border). A gather costs ~3 times a convolution tap, so
    when the mask fills more than 1/DENSE_ABOVE_FILL of its grown box the dense convolution
    of the box (`local_sphere_mean`) is used instead. 12 lesions spread over a 400 x 400 x 326
    study (2 shared CPU cores): 0.2 s instead of 3 s for the dense box."""
    kernel = sphere_kernel(spacing, radius_mm)
    if not mask.any():
        return np.zeros(0)
    half = [n // 2 for n in kernel.shape]
    box, clipped = _grown_bbox(mask, half)
    coords = np.nonzero(mask[box])
    box_size = int(np.prod([b.stop - b.start for b in box]))
    if coords[0].size * DENSE_ABOVE_FILL >= box_size:  # a big, dense mask: convolve the box
        means, _ = local_sphere_mean(suv, mask, spacing, radius_mm)
        return means[coords]
    crop = np.ascontiguousarray(suv[box], dtype=np.float32)
    flat = np.ravel_multi_index(coords, crop.shape)
    strides = np.array(crop.strides) // crop.itemsize
    values = crop.ravel()
    total = np.zeros(flat.size)
    offsets = np.argwhere(kernel) - np.array(half)  # (K, 3)
    if not clipped:  # every neighbour of every mask voxel is inside the crop and the image
        for step in offsets @ strides:
            total += values[flat + step]
        return total / len(offsets)
    # near the border: per axis and per offset value, which mask voxels stay inside
    inside = [{o: (c + o >= 0) & (c + o < n) for o in range(-h, h + 1)}
              for c, n, h in zip(coords, crop.shape, half)]
    count = np.zeros(flat.size)
    for offset, step in zip(offsets, offsets @ strides):
        ok = inside[0][offset[0]] & inside[1][offset[1]] & inside[2][offset[2]]
        total += np.where(ok, values[np.where(ok, flat + step, 0)], 0.0)
        count += ok
    return total / count


def suvpeak(suv: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
            radius_mm: float = SUVPEAK_RADIUS_MM) -> float:
    """PERCIST SUVpeak: the highest mean SUV of a 1 ml sphere (radius 6.2 mm, voxel centres
    within it, inside the image) centred on any voxel of `mask`; the sphere may extend beyond
    the mask. NaN for an empty mask. (Wahl et al. 2009, J Nucl Med 50:122S.)"""
    suv, mask = _volumes(suv, mask)
    if not mask.any():
        return float("nan")
    return float(sphere_means_at(suv, mask, spacing, radius_mm).max())


# ---------------------------------------------------------------------------------------------
# lesions, Dmax


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """18-connected components of a binary mask (scipy.ndimage.label order): (labels, n)."""
    return ndimage.label(np.asarray(mask) != 0, structure=CONNECTIVITY_18)


def lesion_centroids(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) centroids in voxel indices of labels 1..n (unweighted: the mean voxel position)."""
    if n == 0:
        return np.zeros((0, 3))
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    index = np.nonzero(labels)
    lab = labels[index]
    return np.stack([np.bincount(lab, weights=i.astype(np.float64), minlength=n + 1)[1:] / counts
                     for i in index], axis=1)


def max_pairwise_distance(points: np.ndarray, block: int = 1024, hull_above: int = 2048,
                          ) -> float:
    """Largest Euclidean distance between two rows of `points` (m, d); 0 for m = 1, NaN for 0.
    Exact: every pair, in blocks of `block` rows (memory block * m). Above `hull_above`
    points (a noisy prediction of thousands of specks) only the vertices of the convex hull
    are compared (scipy.spatial.ConvexHull): the farthest pair of a point set lies on its
    hull. Coplanar or collinear points (no 3-D hull) fall back to every pair."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return float("nan")
    if len(points) > hull_above:
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # degenerate (e.g. every lesion in one slice): compare all pairs
            pass
    best = 0.0
    for start in range(0, len(points), block):
        chunk = points[start:start + block]
        rest = points[start:]  # pairs (i, j), j >= i: each pair once over the blocks
        d2 = ((chunk[:, None, :] - rest[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def dmax_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Dmax: the largest distance in mm between the centroids of two 18-connected lesions,
        Dmax = max_{i<j} || (c_i - c_j) * spacing ||_2     (c = centroid in voxels)
    0 for one lesion, NaN for an empty mask (Cottereau et al. 2020, J Nucl Med 61:40).
    Labelled on the mask's bounding box (same components, a fraction of the body's cost)."""
    spacing = _spacing(spacing)
    mask = np.asarray(mask) != 0
    if not mask.any():
        return float("nan")
    box, _ = _grown_bbox(mask, (0,) * mask.ndim)
    labels, n = label_lesions(mask[box])
    return max_pairwise_distance(lesion_centroids(labels, n) * np.asarray(spacing))


# ---------------------------------------------------------------------------------------------
# one study


def quantify(suv: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """PET quantities of one binary (X, Y, Z) mask on the study's SUV (same shape, float):
        mtv_ml  = N * v                  (N mask voxels, v = prod(spacing) / 1000 ml)
        suvmax  = max SUV over the mask   suvmean = mean SUV over the mask
        tlg     = sum(SUV over the mask) * v = suvmean * mtv_ml   (SUV·ml)
        suvpeak = `suvpeak` (PERCIST 1 ml sphere)   dmax_mm = `dmax_mm` (lesion centroids)
    Empty mask: mtv_ml = tlg = 0, every other value NaN. Use the ORIGINAL SUV: a volume
    clipped at a cache's suv_max (e.g. 20) would cap SUVmax, SUVpeak and TLG."""
    suv, mask = _volumes(suv, mask)
    spacing = _spacing(spacing)
    v = voxel_ml(spacing)
    n = int(np.count_nonzero(mask))
    nan = float("nan")
    if n == 0:
        return {"suvmax": nan, "suvmean": nan, "suvpeak": nan, "mtv_ml": 0.0, "tlg": 0.0,
                "dmax_mm": nan}
    box, _ = _grown_bbox(mask, (0, 0, 0))  # the mask's bounding box: the body is not read
    values = suv[box][mask[box]].astype(np.float64)
    total = float(values.sum())
    return {"suvmax": float(values.max()), "suvmean": total / n,
            "suvpeak": suvpeak(suv, mask, spacing), "mtv_ml": n * v, "tlg": total * v,
            "dmax_mm": dmax_mm(mask[box], spacing)}


def study_columns(suv: np.ndarray, pred: np.ndarray, ref: np.ndarray,
                  spacing: Sequence[float]) -> dict[str, float]:
    """`quantify` of the prediction and of the reference on the same SUV, as the per-case
    columns STUDY_COLUMNS: suvmax_pred, suvmax_ref, suvmean_pred, ..., dmax_mm_ref."""
    q_pred, q_ref = quantify(suv, pred, spacing), quantify(suv, ref, spacing)
    return {f"{q}_{side}": values[q] for q in QUANTITIES
            for side, values in (("pred", q_pred), ("ref", q_ref))}


def lesion_table(suv: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 detected: Optional[Sequence[bool]] = None, *, case_id: str = "",
                 ) -> list[dict[str, Any]]:
    """One row per 18-connected reference lesion, in scipy.ndimage.label order (LESION_COLUMNS):
    case_id, lesion_id (1..n), volume_ml, suvmax, suvmean, suvpeak (sphere centred on a voxel
    of this lesion; it may reach into the background or another lesion), tlg, centroid_x/y/z
    (voxel indices, array axes), detected (detected[lesion_id - 1]; None when not given).
    `detected`: one bool per lesion in label order, from the caller's matching rule. One
    sphere-mean evaluation serves every lesion."""
    suv, ref = _volumes(suv, ref)
    spacing = _spacing(spacing)
    if ref.any():
        # on the bounding box: labelling a crop that holds every foreground voxel keeps
        # scipy's label order (raster order of each component's first voxel)
        box, _ = _grown_bbox(ref, (0, 0, 0))
        labels, n = label_lesions(ref[box])
    else:
        n = 0
    if detected is not None and len(detected) != n:
        raise ValueError(f"{case_id or 'study'}: detected has {len(detected)} entries but the "
                         f"reference has {n} 18-connected lesions; pass one bool per lesion in "
                         f"scipy.ndimage.label order (quantification.label_lesions)")
    if n == 0:
        return []
    v = voxel_ml(spacing)
    # per voxel of the reference, in np.nonzero order (that of sphere_means_at)
    lab = labels[labels > 0] - 1
    values = suv[box][labels > 0].astype(np.float64)
    means = sphere_means_at(suv, ref, spacing)
    sizes = np.bincount(lab, minlength=n)
    sums = np.bincount(lab, weights=values, minlength=n)
    maxima, peaks = np.full(n, -np.inf), np.full(n, -np.inf)
    np.maximum.at(maxima, lab, values)
    np.maximum.at(peaks, lab, means)
    centroids = lesion_centroids(labels, n) + np.array([b.start for b in box], dtype=np.float64)
    rows = []
    for i in range(n):
        rows.append({"case_id": case_id, "lesion_id": i + 1, "volume_ml": int(sizes[i]) * v,
                     "suvmax": float(maxima[i]), "suvmean": float(sums[i]) / int(sizes[i]),
                     "suvpeak": float(peaks[i]), "tlg": float(sums[i]) * v,
                     "centroid_x": float(centroids[i, 0]), "centroid_y": float(centroids[i, 1]),
                     "centroid_z": float(centroids[i, 2]),
                     "detected": None if detected is None else bool(detected[i])})
    return rows


def _cell(value: Any) -> Any:
    """CSV cell: floats as repr (NaN as `nan`, as per_case.csv), None as empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return value


def write_lesion_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """lesions.csv: LESION_COLUMNS first (extra keys after them), one row per lesion of every
    study (`case_id` tells them apart); NaN as `nan`, an unknown `detected` as empty. Written
    atomically (temporary file + os.replace), so a reader never sees half a file."""
    rows = list(rows)
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in LESION_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*LESION_COLUMNS, *extra], lineterminator="\n",
                            restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# agreement over a cohort


def icc_2_1(ratings: np.ndarray) -> float:
    """ICC(2,1) of an (n targets, k raters) array: two-way random effects, absolute agreement,
    single measurement (Shrout & Fleiss 1979 ICC(2,1) = McGraw & Wong 1996 ICC(A,1)):
        ICC = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)
    with the two-way ANOVA mean squares (grand mean m, row means r_i, column means c_j)
        MSR = k sum_i (r_i - m)^2 / (n - 1)                     targets
        MSC = n sum_j (c_j - m)^2 / (k - 1)                     raters (systematic bias)
        MSE = (SST - (n-1) MSR - (k-1) MSC) / ((n - 1)(k - 1))  residual, SST = sum (x - m)^2
    NaN for n < 2 or k < 2, or when the denominator is 0 (every value the same)."""
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        return float("nan")
    n, k = x.shape
    grand = x.mean()
    msr = k * ((x.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    msc = n * ((x.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    sse = ((x - grand) ** 2).sum() - (n - 1) * msr - (k - 1) * msc
    mse = sse / ((n - 1) * (k - 1))
    denominator = msr + (k - 1) * mse + k * (msc - mse) / n
    return float((msr - mse) / denominator) if denominator > 0 else float("nan")


def agreement(pred: Sequence[float], ref: Sequence[float], min_pairs: int = 3) -> dict[str, Any]:
    """Agreement of paired values (one pair per study):
        d = pred - ref,  bias = mean(d),  sd_diff = SD(d) (n - 1),
        95 % limits of agreement loa_low/high = bias -+ 1.96 sd_diff   (Bland & Altman 1986)
        icc_2_1 = `icc_2_1` of the (n, 2) array [pred, ref]
        spearman = Spearman's rank correlation (scipy.stats.spearmanr)
    Pairs where either value is NaN / inf / None are dropped; `n` is the number of pairs used,
    `n_dropped` the number dropped. Fewer than `min_pairs` (3) pairs: every value NaN."""
    a = np.array([np.nan if v is None else float(v) for v in pred], dtype=np.float64)
    b = np.array([np.nan if v is None else float(v) for v in ref], dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"agreement needs one predicted and one reference value per study; "
                         f"got {a.size} predicted and {b.size} reference values")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    nan = float("nan")
    out: dict[str, Any] = {"n": int(a.size), "n_dropped": int((~keep).sum()), "bias": nan,
                           "sd_diff": nan, "loa_low": nan, "loa_high": nan, "icc_2_1": nan,
                           "spearman": nan}
    if a.size < max(min_pairs, 2):
        return out
    from scipy import stats  # here: scipy.stats takes seconds to import on a busy CPU

    d = a - b
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    with warnings.catch_warnings():  # constant input: NaN is the answer, not a warning
        warnings.simplefilter("ignore")
        rho = float(stats.spearmanr(a, b)[0])
    out.update(bias=bias, sd_diff=sd, loa_low=bias - 1.96 * sd, loa_high=bias + 1.96 * sd,
               icc_2_1=icc_2_1(np.stack([a, b], axis=1)), spearman=rho)
    return out


def _truthy(value: Any) -> bool:
    """has_tumor from a row: a bool, a number, or the text of a CSV cell ("True", "1")."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    try:
        return float("nan") if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _pairs(rows: Sequence[dict], quantity: str) -> tuple[list[float], list[float]]:
    """(pred, ref) values of `quantity` over the tumour studies of `rows`."""
    tumour = [row for row in rows if _truthy(row.get("has_tumor"))]
    return ([_value(row, f"{quantity}_pred") for row in tumour],
            [_value(row, f"{quantity}_ref") for row in tumour])


def cohort_agreement(rows: Sequence[dict], quantities: Sequence[str] = AGREEMENT_QUANTITIES,
                     ) -> dict[str, dict[str, Any]]:
    """`agreement` of predicted vs reference `quantities` (columns `<q>_pred`, `<q>_ref` of
    study_columns) over the studies with `has_tumor`, for summary["agreement"]:
        {"mtv_ml": {"n", "n_dropped", "bias", ...}, "tlg": {...}, "suvmax": {...}}
    A tumour study whose prediction is empty keeps MTV_pred = TLG_pred = 0 (a real
    disagreement) but has no SUVmax_pred (NaN): that pair is dropped, so SUVmax agreement
    covers the tumour studies with a non-empty prediction (see n, n_dropped)."""
    rows = list(rows)
    return {q: agreement(*_pairs(rows, q)) for q in quantities}


# ---------------------------------------------------------------------------------------------
# plots


def _scale(values: np.ndarray) -> tuple[str, dict]:
    """Axis scale for non-negative values: linear, or log / symlog (when zeros occur) when the
    positive values span two decades or more (MTV, TLG of small and bulky disease)."""
    positive = values[values > 0]
    if positive.size < 2 or (values < 0).any() or positive.max() / positive.min() < 100:
        return "linear", {}
    if (values == 0).any():
        return "symlog", {"linthresh": 10.0 ** math.floor(math.log10(positive.min()))}
    return "log", {}


def _finite_pairs(rows: Sequence[dict], quantity: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(v, dtype=np.float64) for v in _pairs(rows, quantity))
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _save_png(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def save_agreement_plots(rows: Sequence[dict], out_dir: str | os.PathLike,
                         quantities: Sequence[str] = AGREEMENT_QUANTITIES) -> list[Path]:
    """Two PNGs in out_dir (tumour studies, pairs with a NaN dropped), one panel per quantity:
    BLAND_ALTMAN_PNG: difference (pred - ref) against the mean of the two, with the bias and
    the 95 % limits of agreement; SCATTER_PNG: predicted against reference with the identity
    line. Axes holding values that span two decades (MTV, TLG) are logarithmic (symlog when
    zeros occur, e.g. a missed tumour's MTV_pred = 0); differences stay linear. matplotlib
    without pyplot (Figure + Agg canvas, no global state); written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_by_q = cohort_agreement(rows, quantities)
    width = 3.6 * len(quantities)
    ba_fig, sc_fig = Figure(figsize=(width, 3.4), dpi=90), Figure(figsize=(width, 3.4), dpi=90)
    for fig in (ba_fig, sc_fig):
        FigureCanvasAgg(fig)
    ba_axes = ba_fig.subplots(1, len(quantities), squeeze=False)[0]
    sc_axes = sc_fig.subplots(1, len(quantities), squeeze=False)[0]
    for q, ax_ba, ax_sc in zip(quantities, ba_axes, sc_axes):
        pred, ref = _finite_pairs(rows, q)
        st = stats_by_q[q]
        label = AGREEMENT_LABELS.get(q, q)
        for ax in (ax_ba, ax_sc):
            ax.grid(True, linewidth=0.4, alpha=0.5)
            ax.tick_params(labelsize=7)
        ax_ba.set_title(f"{label}: Bland–Altman (n = {st['n']})", fontsize=8)
        ax_sc.set_title(f"{label}: predicted vs reference (n = {st['n']})", fontsize=8)
        if pred.size == 0:
            for ax in (ax_ba, ax_sc):
                ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
            continue
        mean, diff = (pred + ref) / 2, pred - ref
        ax_ba.scatter(mean, diff, s=10, alpha=0.7, color="#1f5f99", edgecolors="none")
        if math.isfinite(st["bias"]):
            for y, style, text in ((st["bias"], "-", f"bias {st['bias']:.3g}"),
                                   (st["loa_low"], "--", f"−1.96 SD {st['loa_low']:.3g}"),
                                   (st["loa_high"], "--", f"+1.96 SD {st['loa_high']:.3g}")):
                ax_ba.axhline(y, color="#b03a2e", linestyle=style, linewidth=0.9)
                ax_ba.annotate(text, (0.98, y), xycoords=("axes fraction", "data"), fontsize=6,
                               ha="right", va="bottom", color="#b03a2e")
        both = np.concatenate([pred, ref])
        scale, kw = _scale(both)  # one decision for both figures of a quantity
        ax_ba.set_xscale(scale, **kw)
        ax_ba.set_xlabel(f"mean of predicted and reference {label}", fontsize=7)
        ax_ba.set_ylabel("predicted − reference", fontsize=7)

        ax_sc.scatter(ref, pred, s=10, alpha=0.7, color="#1f5f99", edgecolors="none")
        lo, hi = float(both.min()), float(both.max())
        if scale == "log":
            limits = (lo / 1.5, hi * 1.5)
        else:
            pad = 0.05 * (hi - lo) or 0.5
            limits = (lo - pad, hi + pad)
        ax_sc.plot(limits, limits, color="0.4", linewidth=0.8, label="identity")
        ax_sc.set_xscale(scale, **kw)
        ax_sc.set_yscale(scale, **kw)
        ax_sc.set_xlim(limits)
        ax_sc.set_ylim(limits)
        ax_sc.set_xlabel(f"reference {label}", fontsize=7)
        ax_sc.set_ylabel(f"predicted {label}", fontsize=7)
        ax_sc.legend(fontsize=6, loc="upper left")
        icc = st["icc_2_1"]
        ax_sc.text(0.98, 0.03, f"ICC(2,1) {icc:.3f}\nSpearman {st['spearman']:.3f}",
                   transform=ax_sc.transAxes, ha="right", va="bottom", fontsize=6)
    paths = []
    for fig, name in ((ba_fig, BLAND_ALTMAN_PNG), (sc_fig, SCATTER_PNG)):
        # fixed margins: tight_layout would draw every figure twice
        fig.subplots_adjust(left=0.22 / len(quantities), right=0.99, bottom=0.15, top=0.9,
                            wspace=0.32)
        _save_png(fig, out_dir / name)
        paths.append(out_dir / name)
    return paths
