"""Per-study segmentation metrics and cohort statistics: arrays in, numbers out.

    from metrics import case_metrics, summarise_cohort
    row = case_metrics(pred, ref, spacing=(4.0, 4.0, 4.0))   # one 3-D study, (X, Y, Z) arrays
    summary = summarise_cohort(rows)                          # means over the right subsets, CIs

numpy, scipy and MedPy only: no torch, no models, no run directories, so a user can score their
own masks with it (`python -c "import metrics"` needs none of the training stack). The
evaluation of a run (`test.py`) composes it with prediction (`inference.py`) and pictures
(`pictures.py`). Definitions, the empty-case policy and their sources: docs/evaluation.md.
Metrics follow the autoPET III/IV official evaluation: Dice per 3-D study, false-positive /
false-negative volume over 18-connected components, and an explicit empty-case policy instead
of MedPy's accidents.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from medpy.metric import binary as mp
from scipy import ndimage

# 18-connectivity (faces + edges, not corners), as in the autoPET evaluation (cc3d connectivity=18).
CONNECTIVITY_18 = ndimage.generate_binary_structure(3, 2)


# ---------------------------------------------------------------------------------------------
# per-study metrics


def _union_bbox(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the bounding box of pred | ref grown by `margin` voxels (clipped to the volume)."""
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin,
                                                             union.shape[axis])))
    return tuple(box)


# A reference lesion counts as detected, and a predicted component as a true positive, when the
# two overlap with a Dice of at least this (docs/evaluation.md, "Lesion detection").
LESION_MATCH_DICE = 0.1


def _component_overlap(mask: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """18-connected components of `mask`: (voxel count per component, touches `other` per component)."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY_18)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    touched = np.bincount(labels[other].ravel(), minlength=n + 1)[1:] > 0
    return sizes, touched


def match_lesions(pred: np.ndarray, ref: np.ndarray,
                  min_dice: float = LESION_MATCH_DICE) -> dict[str, np.ndarray]:
    """Lesion-wise matching of the 18-connected components of two binary (X, Y, Z) masks.

    For reference lesion i and predicted component j, Dice_ij = 2 |R_i & P_j| / (|R_i| + |P_j|).
    Reference lesion i is detected when max_j Dice_ij >= min_dice; predicted component j is a
    true positive when max_i Dice_ij >= min_dice, else a false-positive component. Any contact
    is not enough: one component flooding the body touches every lesion but has a Dice of
    ~0 with each, so it detects nothing and counts as one false positive.
    Returns {"ref_sizes", "pred_sizes" (voxels per component, label order of
    scipy.ndimage.label), "ref_detected", "pred_matched" (bool per component), "ref_touched",
    "pred_touched" (any contact, the autoPET FNV / FPV rule), "dice" (n_ref, n_pred)}.
    """
    ref_labels, n_ref = ndimage.label(ref, structure=CONNECTIVITY_18)
    pred_labels, n_pred = ndimage.label(pred, structure=CONNECTIVITY_18)
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:]
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:]
    both = (ref_labels > 0) & (pred_labels > 0)
    pairs = ref_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    overlap = np.bincount(pairs, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)
    overlap = overlap[1:, 1:]  # (n_ref, n_pred) voxels in common
    denominator = ref_sizes[:, None] + pred_sizes[None, :]
    dice = np.where(denominator > 0, 2.0 * overlap / np.maximum(denominator, 1), 0.0)
    return {"ref_sizes": ref_sizes, "pred_sizes": pred_sizes,
            "ref_detected": (dice >= min_dice).any(axis=1) if n_pred else np.zeros(n_ref, bool),
            "pred_matched": (dice >= min_dice).any(axis=0) if n_ref else np.zeros(n_pred, bool),
            "ref_touched": overlap.sum(axis=1) > 0, "pred_touched": overlap.sum(axis=0) > 0,
            "dice": dice}


def distance_penalty_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """HD95 / ASSD given to a tumour study with an empty prediction: the diagonal of the image
    volume in mm, the largest distance two voxels of the study can have."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *,
                 lesions: bool = False) -> dict[str, Any]:
    """Segmentation metrics of one 3-D study (`lesions=True` adds "lesion_detected": one bool
    per reference lesion, in the label order of scipy.ndimage.label on `ref`).

    pred, ref: (X, Y, Z) arrays, any non-zero value is foreground. spacing: voxel size in mm in
    array-axis order (nibabel arrays are x, y, z). Voxel volume v = prod(spacing) / 1000 ml.

    Overlap (MedPy 0.5.2 `dc`, `jc`, `recall`, `precision`), with TP/FP/FN voxel counts:
        dice = 2 TP / (2 TP + FP + FN)     iou = TP / (TP + FP + FN)
        sensitivity = TP / (TP + FN)       precision = TP / (TP + FP)
    Surface distances (MedPy `hd95`, `assd`, connectivity 1, in mm): 95th percentile of the
    symmetric surface distances, and the average symmetric surface distance (bit-identical to
    MedPy's functions on the full volume, computed once for both, see `_hd95_assd`).
    autoPET (official III/IV evaluation, 18-connected components, any contact counts):
        fpv_ml = v * voxels of predicted components that touch no ground-truth voxel
        fnv_ml = v * voxels of ground-truth components that no predicted voxel touches
    Lesion-wise (`match_lesions`: a match needs Dice >= LESION_MATCH_DICE, contact is not
    enough): n_lesions (ground-truth components), n_lesions_detected (those matched by a
    predicted component), n_pred_components, n_fp_components (predicted components that match
    no lesion).

    Empty-case policy (autoPET III/IV convention; never raises, MedPy never sees an empty mask):
        ref empty  -> dice, iou, fnv_ml, sensitivity = NaN (a tumour-free study is judged by
                      fpv_ml), hd95_mm = assd_mm = NaN
        pred empty -> fpv_ml = 0, precision = NaN; for a tumour study hd95_mm = assd_mm =
                      distance_penalty_mm (the volume's diagonal) and distance_penalty = True,
                      so a mean distance always covers every tumour study of a cohort
    So ref empty & pred empty gives fpv_ml = 0 and NaN for everything else but the counts.

    All metrics are computed on the crop to the union bounding box of both masks (+1 voxel):
    overlap counts, components and distances cannot change (tested bit-identical), and the
    distance transform then costs the size of the lesions, not of the body.
    """
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be 3-D arrays of one shape")
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    nan = float("nan")
    row: dict[str, Any] = dict(
        has_tumor=n_ref > 0, dice=nan, iou=nan, hd95_mm=nan, assd_mm=nan, sensitivity=nan,
        precision=nan, fpv_ml=0.0, fnv_ml=nan, n_lesions=0, n_lesions_detected=0,
        n_fp_components=0, n_pred_components=0, distance_penalty=False,
        pred_volume_ml=n_pred * voxel_ml, ref_volume_ml=n_ref * voxel_ml)
    if lesions:
        row["lesion_detected"] = []
    if n_pred == 0 and n_ref == 0:
        return row
    if n_pred == 0:  # a tumour study with nothing predicted: the stated distance penalty
        row["hd95_mm"] = row["assd_mm"] = distance_penalty_mm(pred.shape, spacing)
        row["distance_penalty"] = True
    box = _union_bbox(pred, ref)
    p, r = pred[box], ref[box]

    match = match_lesions(p, r)  # the crop keeps the raster order, so the label order too
    if lesions:
        row["lesion_detected"] = [bool(d) for d in match["ref_detected"]]
    row["fpv_ml"] = float(match["pred_sizes"][~match["pred_touched"]].sum()) * voxel_ml
    row["n_pred_components"] = int(match["pred_sizes"].size)
    row["n_fp_components"] = int((~match["pred_matched"]).sum())
    if n_ref > 0:
        row["dice"] = float(mp.dc(p, r))
        row["iou"] = float(mp.jc(p, r))
        row["sensitivity"] = float(mp.recall(p, r))
        row["fnv_ml"] = float(match["ref_sizes"][~match["ref_touched"]].sum()) * voxel_ml
        row["n_lesions"] = int(match["ref_sizes"].size)
        row["n_lesions_detected"] = int(match["ref_detected"].sum())
    if n_pred > 0:
        row["precision"] = float(mp.precision(p, r))
    if n_pred > 0 and n_ref > 0:
        row["hd95_mm"], row["assd_mm"] = _hd95_assd(p, r, spacing)
    return row


def _hd95_assd(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """MedPy's `hd95` and `assd`, sharing one pair of surface-distance computations.

    Both MedPy functions compute the same two directed surface-distance arrays (one distance
    transform each); computing them once and combining them exactly as MedPy 0.5.2 does
    (`percentile(hstack, 95)`, `concatenate(...).mean()`) halves the cost. Equality with the
    public functions is tested (tests/test_metrics.py), so a MedPy change would be caught.
    """
    surface_distances = getattr(mp, "__surface_distances")  # module-level, not name-mangled
    d_pred = surface_distances(pred, ref, spacing, 1)
    d_ref = surface_distances(ref, pred, spacing, 1)
    hd95 = np.percentile(np.hstack((d_pred, d_ref)), 95)
    assd = np.concatenate([d_pred, d_ref]).mean()
    return float(hd95), float(assd)


# ---------------------------------------------------------------------------------------------
# cohort summary


def _bootstrap_ci(values: np.ndarray, n_bootstrap: int, rng: np.random.Generator,
                  ) -> Optional[list[float]]:
    """Percentile bootstrap 95 % CI of the mean, resampling studies with replacement."""
    if values.size == 0 or n_bootstrap <= 0:
        return None
    idx = rng.integers(0, values.size, size=(n_bootstrap, values.size))  # (B, n)
    means = values[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def _mean(rows: list[dict], key: str, where=lambda row: True) -> np.ndarray:
    """Finite values of `key` over the rows selected by `where` (NaN = not defined, skipped)."""
    values = np.array([float(row[key]) for row in rows if where(row)], dtype=np.float64)
    return values[np.isfinite(values)]


def summarise_cohort(rows: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0,
                     ) -> dict[str, Any]:
    """Cohort figures from `case_metrics` rows (one per study).

    Means skip NaN, so (autoPET III/IV): mean Dice / IoU / FNV / sensitivity are over studies
    with tumour, mean FPV is reported over tumour-free studies (`fpv_ml_tumor_free`, the
    false alarms a healthy patient gets) and over all studies (`fpv_ml`), HD95 / ASSD over
    every tumour study (an empty prediction there carries the penalty of `case_metrics`;
    `n_distance_penalty` counts them); `n` beside every mean says how many studies it covers.
    Lesion detection (match rule of `match_lesions`) pools counts over all studies:
        TP = sum n_lesions_detected, FN = sum n_lesions - TP, FP = sum n_fp_components
        recall = TP / (TP + FN), precision = TP / (TP + FP), F1 = 2 TP / (2 TP + FP + FN)
    `ci95`: percentile bootstrap (n_bootstrap resamples of the studies a mean covers, seeded)
    for Dice, FPV and FNV.
    """
    rows = list(rows)
    rng = np.random.default_rng(seed)
    tumour = lambda row: bool(row["has_tumor"])  # noqa: E731
    free = lambda row: not bool(row["has_tumor"])  # noqa: E731
    subsets = {  # name -> (column, rows it is averaged over)
        "dice": ("dice", tumour), "iou": ("iou", tumour), "sensitivity": ("sensitivity", tumour),
        "precision": ("precision", lambda row: True), "fnv_ml": ("fnv_ml", tumour),
        "fpv_ml": ("fpv_ml", lambda row: True), "fpv_ml_tumor_free": ("fpv_ml", free),
        "fpv_ml_tumor": ("fpv_ml", tumour), "hd95_mm": ("hd95_mm", tumour),
        "assd_mm": ("assd_mm", tumour)}
    means: dict[str, dict[str, Any]] = {}
    for name, (column, where) in subsets.items():
        values = _mean(rows, column, where)
        means[name] = {"mean": float(values.mean()) if values.size else float("nan"),
                       "n": int(values.size)}
        if name in ("dice", "fpv_ml_tumor_free", "fpv_ml", "fnv_ml"):
            means[name]["ci95"] = _bootstrap_ci(values, n_bootstrap, rng)

    tp = sum(int(row["n_lesions_detected"]) for row in rows)
    fn = sum(int(row["n_lesions"]) for row in rows) - tp
    fp = sum(int(row["n_fp_components"]) for row in rows)
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {
        "n_studies": len(rows),
        "n_tumor": sum(tumour(row) for row in rows),
        "n_tumor_free": sum(free(row) for row in rows),
        "n_tumor_free_with_fp": sum(free(row) and float(row["fpv_ml"]) > 0 for row in rows),
        "n_tumor_missed": sum(tumour(row) and int(row["n_lesions_detected"]) == 0 for row in rows),
        "n_distance_penalty": sum(bool(row.get("distance_penalty", False)) for row in rows),
        "metrics": means,
        "lesions": {"n_lesions": tp + fn, "detected": tp, "false_positive_components": fp,
                    "recall": ratio(tp, tp + fn), "precision": ratio(tp, tp + fp),
                    "f1": ratio(2 * tp, 2 * tp + fp + fn)},
        "bootstrap": {"n_bootstrap": n_bootstrap, "seed": seed, "method": "percentile"},
    }


# Zero differences (both configurations scored a study identically, e.g. no false positive on a
# healthy study for either) stay in the ranking and only their ranks are dropped (Pratt 1959):
# a study on which the two agree is evidence of agreement, not a study that was never tested;
# discarding zeros ("wilcox") tests only the studies that differ and can move the p-value the
# wrong way when a difference shrinks to zero (Pratt's paradox). scipy calls it the more
# conservative of the two, with Cureton's (1967) normal approximation.
WILCOXON_ZERO_METHOD = "pratt"


def paired_comparison(a: Sequence[float], b: Sequence[float], *, n_bootstrap: int = 10000,
                      seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two configurations scored on the same studies (a[i], b[i]: study i).

    Pairs with a NaN on either side are dropped first (counted in `n_dropped`); every figure
    below covers the `n` remaining pairs, so mean_a - mean_b == mean_diff.
        mean_diff  mean of d_i = a_i - b_i
        ci95       percentile bootstrap 95 % interval of mean_diff: n_bootstrap resamples of the
                   n studies with replacement (numpy default_rng(seed)); None when n = 0 or
                   n_bootstrap = 0
        wilcoxon_p two-sided Wilcoxon signed-rank p-value of the d_i (scipy.stats.wilcoxon,
                   zero_method WILCOXON_ZERO_METHOD, method "auto": exact for n <= 50 without
                   ties or zeros, otherwise the normal approximation above n = 13 and exact
                   permutations below); 1.0 when every d_i is 0 (no evidence of a difference),
                   NaN when n = 0
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D sequences of one length, got {a.shape} "
                         f"and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    nan = float("nan")
    out: dict[str, Any] = {"n": int(d.size), "n_dropped": int((~keep).sum()),
                           "mean_a": float(a.mean()) if d.size else nan,
                           "mean_b": float(b.mean()) if d.size else nan,
                           "mean_diff": float(d.mean()) if d.size else nan,
                           "ci95": _bootstrap_ci(d, n_bootstrap, np.random.default_rng(seed)),
                           "wilcoxon_p": nan, "zero_method": WILCOXON_ZERO_METHOD,
                           "n_bootstrap": n_bootstrap, "seed": seed}
    if d.size and not d.any():
        out["wilcoxon_p"] = 1.0
    elif d.size:
        out["wilcoxon_p"] = float(wilcoxon(d, zero_method=WILCOXON_ZERO_METHOD,
                                           alternative="two-sided").pvalue)
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of a `summarise_cohort` result."""
    def ci(entry: dict) -> str:
        bounds = entry.get("ci95")
        return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""

    m = summary["metrics"]
    lines = [f"studies: {summary['n_studies']} ({summary['n_tumor']} with tumour, "
             f"{summary['n_tumor_free']} tumour-free; {summary['n_tumor_free_with_fp']} "
             f"tumour-free with false positives, {summary['n_tumor_missed']} tumour studies "
             f"with no lesion found)",
             f"{'metric':<26}{'mean':>10}{'n':>6}  95% CI"]
    rows = [("Dice (tumour studies)", "dice"), ("IoU (tumour studies)", "iou"),
            ("FPV ml (tumour-free)", "fpv_ml_tumor_free"), ("FPV ml (all)", "fpv_ml"),
            ("FNV ml (tumour studies)", "fnv_ml"), ("HD95 mm (tumour studies)", "hd95_mm"),
            ("ASSD mm (tumour studies)", "assd_mm"), ("sensitivity (voxels)", "sensitivity"),
            ("precision (voxels)", "precision")]
    for label, key in rows:
        lines.append(f"{label:<26}{m[key]['mean']:>10.3f}{m[key]['n']:>6}  {ci(m[key])}")
    if summary.get("n_distance_penalty"):
        lines.append(f"  (HD95 / ASSD: {summary['n_distance_penalty']} tumour studies with an empty "
                     "prediction carry the penalty of the volume's diagonal)")
    les = summary["lesions"]
    lines.append(f"lesions: {les['detected']}/{les['n_lesions']} detected (Dice >= "
                 f"{LESION_MATCH_DICE} with a predicted component), "
                 f"{les['false_positive_components']} false-positive components; recall "
                 f"{les['recall']:.3f}, precision {les['precision']:.3f}, F1 {les['f1']:.3f}")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# evaluation of a run


def component_stats(pred: np.ndarray, suv: Optional[np.ndarray] = None):
    """18-connected components of a binary volume: (labels, n, sizes, suvmax), sizes (n + 1,)
    voxels per label and suvmax (n + 1,) the highest SUV per label (label 0, the background,
    and every label without `suv`: -inf), read over the foreground voxels only. The one
    labelling postprocess_mask, postprocess_counts and bench/pp_frontier.py filter from."""
    labels, n = ndimage.label(pred, structure=CONNECTIVITY_18)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    suvmax = np.full(n + 1, -np.inf)
    if suv is not None and n:
        fg = labels > 0
        np.maximum.at(suvmax, labels[fg], np.asarray(suv, np.float64)[fg])
    return labels, n, sizes, suvmax


def postprocess_mask(mask: np.ndarray, *, spacing: Sequence[float], suv: Optional[np.ndarray] = None,
                     suv_floor: float = 0.0, min_component_ml: float = 0.0,
                     min_component_suvmax: float = 0.0) -> np.ndarray:
    """Optional clean-up of a binary (X, Y, Z) prediction (docs/evaluation.md, "Post-processing"):
    drop voxels with SUV < suv_floor (needs `suv`), then drop the 18-connected components smaller
    than min_component_ml (volume = voxels * prod(spacing) / 1000) or whose highest SUV is below
    min_component_suvmax (needs `suv`). Zero settings disable each step."""
    mask = np.asarray(mask, dtype=bool)
    if (suv_floor > 0 or min_component_suvmax > 0) and suv is None:
        raise ValueError("postprocess_mask: suv_floor / min_component_suvmax need the SUV volume")
    if suv_floor > 0:
        mask = mask & (suv >= suv_floor)
    if (min_component_ml > 0 or min_component_suvmax > 0) and mask.any():
        labels, n, sizes, suvmax = component_stats(mask, suv if min_component_suvmax > 0 else None)
        keep = np.ones(n + 1, bool)
        if min_component_ml > 0:
            keep &= sizes * (float(np.prod(spacing)) / 1000) >= min_component_ml
        if min_component_suvmax > 0:
            keep &= suvmax >= min_component_suvmax
        keep[0] = False
        mask = keep[labels]
    return mask


THRESHOLD_CANDIDATES = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95


def counts_above(prob: np.ndarray, ref: np.ndarray,
                 thresholds: Sequence[float] = THRESHOLD_CANDIDATES) -> np.ndarray:
    """(len(thresholds), 3) voxel counts TP, FP, FN of the masks prob > t against ref, for every
    t of the ascending `thresholds`, in one pass over the volume."""
    edges = np.asarray(thresholds, dtype=np.float64)
    if edges.ndim != 1 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"thresholds must be strictly ascending, got {thresholds}")
    ref = np.asarray(ref, dtype=bool)
    prob = np.asarray(prob, dtype=np.float64)
    out = np.zeros((len(edges), 3), dtype=np.int64)
    for column, voxels in ((0, prob[ref]), (1, prob[~ref])):
        # n_below[i] = voxels exceeding exactly i thresholds; prob > t_k <=> more than k exceeded
        n_below = np.bincount(np.searchsorted(edges, voxels, side="left"), minlength=len(edges) + 1)
        out[:, column] = n_below[::-1].cumsum()[::-1][1:]
    out[:, 2] = int(ref.sum()) - out[:, 0]
    return out


POSTPROCESS_GRID = {  # the candidates tune_postprocess tries on the validation studies
    "threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),  # the default of config pp_thresholds
    "suv_floor": (0.0, 1.5, 2.5),
    "min_component_ml": (0.0, 0.1, 0.3),
    "min_component_suvmax": (0.0, 3.0, 4.0),
}


def postprocess_grid(thresholds: Sequence[float]) -> dict:
    """POSTPROCESS_GRID with the threshold axis a run's config gives (`pp_thresholds`)."""
    return {**POSTPROCESS_GRID, "threshold": tuple(float(t) for t in thresholds)}


def postprocess_counts(prob: np.ndarray, ref: np.ndarray, suv: np.ndarray,
                       spacing: Sequence[float], grid: dict = POSTPROCESS_GRID) -> np.ndarray:
    """Voxel counts (TP, FP, FN) of one study for every combination of the grid, shape
    (n_threshold, n_floor, n_min_ml, n_min_suvmax, 3): what `choose_postprocessing` scores.
    Exactly what `postprocess_mask` would give (tested), with one component labelling per
    (threshold, floor) instead of one per combination."""
    ref = np.asarray(ref) > 0
    suv = np.asarray(suv, np.float64)
    n_ref, voxel_ml = int(ref.sum()), float(np.prod(spacing)) / 1000
    counts = np.zeros((*(len(v) for v in grid.values()), 3), np.int64)
    for i, threshold in enumerate(grid["threshold"]):
        raw = np.asarray(prob) > threshold
        for j, floor in enumerate(grid["suv_floor"]):
            pred = raw & (suv >= floor) if floor > 0 else raw
            labels, n, sizes, suvmax = component_stats(pred, suv)
            sizes = sizes[1:]
            hits = np.bincount(labels[ref], minlength=n + 1)[1:]  # tumour voxels per component
            for k, min_ml in enumerate(grid["min_component_ml"]):
                for m, min_suvmax in enumerate(grid["min_component_suvmax"]):
                    keep = (sizes * voxel_ml >= min_ml) & (suvmax[1:] >= min_suvmax)
                    tp = int(hits[keep].sum())
                    counts[i, j, k, m] = (tp, int(sizes[keep].sum()) - tp, n_ref - tp)
    return counts


PP_OBJECTIVES = ("pooled_dice", "mean_dice", "mean_dice_fpv")  # config pp_objective


def _has_tumour(counts: np.ndarray) -> np.ndarray:
    """Which studies of `counts` (n_studies, *grid, 3) have tumour: TP + FN, the study's tumour
    voxels, is the same at every grid combination; > 0 at the first."""
    tp, _, fn = np.moveaxis(counts, -1, 0)
    return (tp + fn).reshape(len(counts), -1)[:, 0] > 0


def _study_dice(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tumour, dice): which studies of `counts` (n_studies, *grid, 3) have tumour
    (`_has_tumour`) and the Dice 2TP / (2TP + FP + FN) of those studies, per grid combination
    (n_tumour_studies, *grid)."""
    tumour = _has_tumour(counts)
    tp, fp, fn = np.moveaxis(counts[tumour], -1, 0)
    return tumour, 2 * tp / (2 * tp + fp + fn)


def tumour_free_fpv_ml(counts: np.ndarray, voxel_ml: Sequence[float]) -> np.ndarray:
    """The mean false-positive volume in ml over the tumour-free studies of `counts`
    (n_studies, *grid, 3), per grid combination: on a tumour-free study every predicted voxel
    is a false positive, so this is the evaluation's `fpv_ml_tumor_free` for each setting.
    voxel_ml: each study's voxel volume in ml (its scoring grid)."""
    counts, voxel_ml = np.asarray(counts), np.asarray(voxel_ml, np.float64)
    if voxel_ml.shape != (len(counts),):
        raise ValueError(f"voxel_ml needs one volume per study ({len(counts)}), got shape "
                         f"{voxel_ml.shape}")
    free = ~_has_tumour(counts)
    if not free.any():
        raise ValueError("the false-positive volume of tumour-free studies needs at least one "
                         "validation study without tumour")
    fp = counts[free][..., 1]  # (n_free, *grid)
    volume = fp * voxel_ml[free].reshape(-1, *([1] * (fp.ndim - 1)))
    return volume.mean(axis=0)


def postprocess_objective(counts: np.ndarray, objective: str = "pooled_dice",
                          voxel_ml: Optional[Sequence[float]] = None,
                          max_fpv_ml: float = 1.0) -> np.ndarray:
    """The score of every grid combination over the studies of `counts`, the per-study
    `postprocess_counts` stacked on a first axis (n_studies, *grid shape, 3); higher is better:
    - "pooled_dice": 2 sum TP / (2 sum TP + sum FP + sum FN) over all the studies. It charges the
      false positives of tumour-free studies, but a large lesion outweighs many small ones.
    - "mean_dice": the mean over the tumour studies of each study's Dice 2TP / (2TP + FP + FN),
      the figure the evaluation reports (metrics.summarise). Every study weighs the same, so a
      setting that deletes a study's only small lesion costs that study's whole Dice; the false
      positives count through the tumour studies, which carry the same physiological uptake
      (kidneys, ureters, bladder) as the tumour-free ones, not through the tumour-free studies.
    - "mean_dice_fpv": "mean_dice" under a limit on the false alarms of healthy studies: where
      the mean false-positive volume of the tumour-free studies (`tumour_free_fpv_ml`, needs
      `voxel_ml`) is at most `max_fpv_ml`, the score is the mean Dice (in [0, 1]); elsewhere it
      is minus that volume, below every setting within the limit. So the highest score is the
      best mean Dice within the limit, or, where no setting meets it, the lowest volume.
    """
    counts = np.asarray(counts)
    if objective == "pooled_dice":
        tp, fp, fn = np.moveaxis(counts.sum(axis=0), -1, 0)
        return np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    if objective not in PP_OBJECTIVES:
        raise ValueError(f"pp_objective must be one of {PP_OBJECTIVES}, got {objective!r}")
    tumour, dice = _study_dice(counts)
    if not tumour.any():
        raise ValueError(f"pp_objective={objective} needs at least one validation study with "
                         "tumour")
    mean_dice = dice.mean(axis=0)
    if objective == "mean_dice":
        return mean_dice
    if voxel_ml is None:
        raise ValueError("pp_objective=mean_dice_fpv needs each study's voxel volume (voxel_ml)")
    fpv = tumour_free_fpv_ml(counts, voxel_ml)
    return np.where(fpv <= max_fpv_ml, mean_dice, -fpv)


def choose_postprocessing(counts: np.ndarray, grid: dict = POSTPROCESS_GRID,
                          objective: str = "pooled_dice",
                          voxel_ml: Optional[Sequence[float]] = None,
                          max_fpv_ml: float = 1.0) -> tuple[dict, float]:
    """The grid combination with the highest `postprocess_objective` over the studies whose
    `postprocess_counts` were stacked into `counts` (the VALIDATION studies). Ties go to the
    stricter setting (the later candidate of each axis, i.e. fewer false positives). Returns
    (settings, score)."""
    score = postprocess_objective(counts, objective, voxel_ml, max_fpv_ml)
    flat = np.flatnonzero(score == score.max())[-1]  # C order: the last tie is the strictest
    index = np.unravel_index(flat, score.shape)
    chosen = {key: float(values[i]) for (key, values), i in zip(grid.items(), index)}
    return chosen, float(score[index])
