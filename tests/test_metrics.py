"""metrics.case_metrics / summarise_cohort against MedPy and hand-computed volumes."""

import math

import numpy as np
import pytest
from medpy.metric import binary as mp

import metrics


def cube(shape, lo, size):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, a + size) for a in lo)] = 1
    return mask


SHAPE = (24, 20, 18)


# ---- empty-case policy: all four combinations ---------------------------------------------

def test_both_empty():
    m = metrics.case_metrics(np.zeros(SHAPE), np.zeros(SHAPE), (1.0, 1.0, 1.0))
    assert m["has_tumor"] is False
    for key in ("dice", "iou", "hd95_mm", "assd_mm", "sensitivity", "precision", "fnv_ml"):
        assert math.isnan(m[key]), key
    assert m["fpv_ml"] == 0.0
    assert (m["n_lesions"], m["n_lesions_detected"], m["n_fp_components"]) == (0, 0, 0)
    assert m["pred_volume_ml"] == m["ref_volume_ml"] == 0.0


def test_empty_reference_prediction_present():
    pred = cube(SHAPE, (2, 2, 2), 3)
    m = metrics.case_metrics(pred, np.zeros(SHAPE), (2.0, 2.0, 3.0))
    assert m["has_tumor"] is False
    for key in ("dice", "iou", "hd95_mm", "assd_mm", "sensitivity", "fnv_ml"):
        assert math.isnan(m[key]), key
    assert m["precision"] == 0.0
    assert m["fpv_ml"] == pytest.approx(27 * 12 / 1000)
    assert (m["n_lesions"], m["n_lesions_detected"], m["n_fp_components"]) == (0, 0, 1)


def test_empty_prediction_reference_present():
    ref = cube(SHAPE, (2, 2, 2), 3)
    m = metrics.case_metrics(np.zeros(SHAPE), ref, (2.0, 2.0, 3.0))
    assert m["has_tumor"] is True
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["sensitivity"] == 0.0
    assert math.isnan(m["precision"])
    # the stated distance penalty: the diagonal of the volume (24*2, 20*2, 18*3 mm)
    diagonal = math.sqrt(48 ** 2 + 40 ** 2 + 54 ** 2)
    assert m["hd95_mm"] == m["assd_mm"] == pytest.approx(diagonal) and m["distance_penalty"]
    assert m["fpv_ml"] == 0.0
    assert m["fnv_ml"] == pytest.approx(27 * 12 / 1000)
    assert (m["n_lesions"], m["n_lesions_detected"], m["n_fp_components"]) == (1, 0, 0)


def test_flooding_the_body_detects_no_lesion():
    """One predicted component covering everything touches every lesion (so autoPET's FNV is 0)
    but overlaps each with a Dice far below 0.1: no lesion is detected, one false positive."""
    ref = cube(SHAPE, (2, 2, 2), 2) + cube(SHAPE, (12, 12, 10), 2)
    m = metrics.case_metrics(np.ones(SHAPE), ref, (1.0, 1.0, 1.0))
    assert m["fnv_ml"] == 0.0 and m["fpv_ml"] == 0.0  # the official zero-overlap rule
    assert (m["n_lesions"], m["n_lesions_detected"], m["n_fp_components"]) == (2, 0, 1)
    assert m["n_pred_components"] == 1


def test_lesion_match_needs_a_dice_of_one_tenth():
    ref = cube(SHAPE, (4, 4, 4), 3)  # 27 voxels
    # a 3x3x3 prediction shifted by 2 voxels: overlap 9, Dice 18 / 54 = 0.33 -> detected
    m = metrics.case_metrics(cube(SHAPE, (6, 4, 4), 3), ref, (1.0, 1.0, 1.0))
    assert (m["n_lesions_detected"], m["n_fp_components"]) == (1, 0)
    # one voxel of contact from a 6x6x6 block: Dice 2 / (27 + 216) = 0.008 -> missed, and the
    # block is a false positive, although autoPET's any-contact FPV / FNV count it as a hit
    pred = cube(SHAPE, (6, 6, 6), 6)
    m = metrics.case_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert (pred & ref).sum() == 1
    assert (m["n_lesions_detected"], m["n_fp_components"], m["fnv_ml"], m["fpv_ml"]) == (0, 1, 0, 0)
    assert metrics.match_lesions(pred != 0, ref != 0)["dice"][0, 0] == pytest.approx(2 / 243)


def test_both_present_matches_medpy():
    rng = np.random.default_rng(0)
    ref = cube(SHAPE, (4, 5, 3), 6)
    pred = cube(SHAPE, (6, 4, 4), 5)
    pred[rng.random(SHAPE) > 0.995] = 1  # scattered false positives
    spacing = (0.8, 1.3, 3.0)
    m = metrics.case_metrics(pred, ref, spacing)
    assert m["dice"] == pytest.approx(mp.dc(pred, ref), abs=1e-12)
    assert m["iou"] == pytest.approx(mp.jc(pred, ref), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(mp.recall(pred, ref), abs=1e-12)
    assert m["precision"] == pytest.approx(mp.precision(pred, ref), abs=1e-12)
    # bounding-box crop: bit-identical to MedPy on the full volume
    assert m["hd95_mm"] == mp.hd95(pred, ref, voxelspacing=spacing)
    assert m["assd_mm"] == mp.assd(pred, ref, voxelspacing=spacing)


# ---- hand-made volumes with known answers --------------------------------------------------

def test_anisotropic_known_distances():
    # Two 3x3x3 cubes 10 voxels apart along z, spacing 3 mm in z (0.5 and 2 mm in-plane).
    # Surface voxels (all but the centre) of the z=2,3,4 layers of one cube lie 10, 9, 8 slices
    # from the nearest surface layer of the other: 30, 27, 24 mm, for 9, 8, 9 voxels.
    pred = cube((20, 20, 20), (2, 2, 2), 3)
    ref = cube((20, 20, 20), (2, 2, 12), 3)
    m = metrics.case_metrics(pred, ref, (0.5, 2.0, 3.0))
    assert m["hd95_mm"] == pytest.approx(30.0)
    assert m["assd_mm"] == pytest.approx((9 * 30 + 8 * 27 + 9 * 24) / 26)
    assert m["dice"] == 0.0
    voxel_ml = 0.5 * 2.0 * 3.0 / 1000
    assert m["fpv_ml"] == pytest.approx(27 * voxel_ml)
    assert m["fnv_ml"] == pytest.approx(27 * voxel_ml)
    assert m["pred_volume_ml"] == m["ref_volume_ml"] == pytest.approx(27 * voxel_ml)
    # axis order matters: the same cubes with the spacing reversed are 5 mm apart per slice
    assert metrics.case_metrics(pred, ref, (3.0, 2.0, 0.5))["hd95_mm"] == pytest.approx(5.0)


def test_known_overlap():
    ref = cube(SHAPE, (2, 2, 2), 4)  # 64 voxels
    pred = cube(SHAPE, (2, 2, 4), 4)  # 64 voxels, 32 shared
    m = metrics.case_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 32 / 128)
    assert m["iou"] == pytest.approx(32 / 96)
    assert m["sensitivity"] == m["precision"] == pytest.approx(0.5)
    assert m["fpv_ml"] == 0.0 and m["fnv_ml"] == 0.0
    assert (m["n_lesions"], m["n_lesions_detected"], m["n_fp_components"]) == (1, 1, 0)


def test_18_connectivity_edge_connects_corner_does_not():
    spacing = (2.0, 2.0, 2.0)  # 0.008 ml per voxel
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2, 2, 2] = 1
    # prediction: the hit voxel plus one sharing only an edge -> one component, no FP
    pred = ref.copy()
    pred[3, 3, 2] = 1
    m = metrics.case_metrics(pred, ref, spacing)
    assert m["fpv_ml"] == 0.0 and m["n_fp_components"] == 0
    # ... plus one sharing only a corner -> a separate, false-positive component
    pred = ref.copy()
    pred[3, 3, 3] = 1
    m = metrics.case_metrics(pred, ref, spacing)
    assert m["fpv_ml"] == pytest.approx(0.008) and m["n_fp_components"] == 1

    # the same for ground-truth lesions: edge-touching voxels form one lesion (detected)
    pred = np.zeros_like(ref)
    pred[2, 2, 2] = 1
    gt = pred.copy()
    gt[2, 3, 3] = 1
    m = metrics.case_metrics(pred, gt, spacing)
    assert m["fnv_ml"] == 0.0 and (m["n_lesions"], m["n_lesions_detected"]) == (1, 1)
    gt = pred.copy()
    gt[3, 3, 3] = 1  # corner only: a second, missed lesion
    m = metrics.case_metrics(pred, gt, spacing)
    assert m["fnv_ml"] == pytest.approx(0.008) and (m["n_lesions"], m["n_lesions_detected"]) == (2, 1)


def test_lesion_counts_several_components():
    ref = cube(SHAPE, (1, 1, 1), 3) + cube(SHAPE, (10, 10, 10), 3) + cube(SHAPE, (18, 2, 12), 2)
    pred = cube(SHAPE, (2, 2, 2), 3) + cube(SHAPE, (15, 15, 2), 2)  # hits lesion 1, one FP
    m = metrics.case_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert (m["n_lesions"], m["n_lesions_detected"], m["n_fp_components"]) == (3, 1, 1)
    assert m["fnv_ml"] == pytest.approx((27 + 8) / 1000)
    assert m["fpv_ml"] == pytest.approx(8 / 1000)


# ---- bounding-box crop -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bbox_crop_identical_to_full_volume(seed):
    rng = np.random.default_rng(seed)
    shape = (30, 26, 22)
    pred = np.zeros(shape, np.uint8)
    ref = np.zeros(shape, np.uint8)
    for mask in (pred, ref):
        for _ in range(3):
            lo = rng.integers(0, np.array(shape) - 4)
            mask[tuple(slice(a, a + s) for a, s in zip(lo, rng.integers(1, 5, 3)))] = 1
    ref[0, 5:9, 3:6] = 1  # touches the volume border: the crop must not add a margin there
    pred[-1, 0, -1] = 1
    spacing = tuple(rng.uniform(0.5, 4.0, 3))
    m = metrics.case_metrics(pred, ref, spacing)
    assert m["hd95_mm"] == mp.hd95(pred, ref, voxelspacing=spacing)
    assert m["assd_mm"] == mp.assd(pred, ref, voxelspacing=spacing)
    box = metrics._union_bbox(pred != 0, ref != 0)
    assert all(b.start >= 0 and b.stop <= n for b, n in zip(box, shape))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        metrics.case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))


# ---- cohort ----------------------------------------------------------------------------------

def _rows():
    rng = np.random.default_rng(3)
    rows = []
    for i in range(12):
        ref = cube(SHAPE, (3, 3, 3), 4) if i % 2 == 0 else np.zeros(SHAPE, np.uint8)
        pred = cube(SHAPE, tuple(int(v) for v in rng.integers(2, 6, 3)), 4) if i % 3 else \
            np.zeros(SHAPE, np.uint8)
        rows.append({"case_id": f"c{i}", **metrics.case_metrics(pred, ref, (1.0, 2.0, 3.0))})
    return rows


def test_summary_means_cover_the_right_studies():
    rows = _rows()
    s = metrics.summarise_cohort(rows, n_bootstrap=200, seed=0)
    assert (s["n_studies"], s["n_tumor"], s["n_tumor_free"]) == (12, 6, 6)
    tumour = [r for r in rows if r["has_tumor"]]
    free = [r for r in rows if not r["has_tumor"]]
    assert s["metrics"]["dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in tumour]))
    assert s["metrics"]["dice"]["n"] == 6
    assert s["metrics"]["fpv_ml_tumor_free"]["mean"] == pytest.approx(
        np.mean([r["fpv_ml"] for r in free]))
    assert s["metrics"]["fpv_ml"]["n"] == 12
    # distances cover every tumour study (penalty where the prediction is empty), nothing else
    assert s["metrics"]["hd95_mm"]["n"] == 6 and s["metrics"]["hd95_mm"]["mean"] == \
        pytest.approx(np.mean([r["hd95_mm"] for r in tumour]))
    assert s["n_distance_penalty"] == sum(r["distance_penalty"] for r in tumour) > 0
    tp = sum(r["n_lesions_detected"] for r in rows)
    fn = sum(r["n_lesions"] for r in rows) - tp
    fp = sum(r["n_fp_components"] for r in rows)
    assert s["lesions"]["recall"] == pytest.approx(tp / (tp + fn))
    assert s["lesions"]["precision"] == pytest.approx(tp / (tp + fp))
    assert s["lesions"]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_bootstrap_ci_contains_mean_and_is_seeded():
    rows = _rows()
    s = metrics.summarise_cohort(rows, n_bootstrap=500, seed=1)
    for key in ("dice", "fpv_ml", "fpv_ml_tumor_free", "fnv_ml"):
        low, high = s["metrics"][key]["ci95"]
        assert low <= s["metrics"][key]["mean"] <= high, key
    dice_ci = s["metrics"]["dice"]["ci95"]
    assert dice_ci[0] < dice_ci[1]  # the Dice values differ, so the interval is not a point
    assert metrics.summarise_cohort(rows, n_bootstrap=500, seed=1) == s


def test_summary_without_tumour_studies_is_nan_not_error():
    rows = [{"case_id": "a", **metrics.case_metrics(np.zeros(SHAPE), np.zeros(SHAPE),
                                                        (1, 1, 1))}]
    s = metrics.summarise_cohort(rows, n_bootstrap=10)
    assert math.isnan(s["metrics"]["dice"]["mean"]) and s["metrics"]["dice"]["n"] == 0
    assert s["metrics"]["dice"]["ci95"] is None
    assert math.isnan(s["lesions"]["recall"])
    text = metrics.format_summary(s)
    assert "Dice" in text and "tumour-free" in text


# ---- post-processing and its tuning on validation -------------------------------------------

def test_postprocess_drops_components_below_an_suvmax():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:3, 1:3, 1:3] = True  # SUVmax 5: kept
    mask[6:8, 6:8, 6:8] = True  # SUVmax 2: dropped at min_component_suvmax=3
    suv = np.full(mask.shape, 1.0)
    suv[1, 1, 1], suv[6, 6, 6] = 5.0, 2.0
    out = metrics.postprocess_mask(mask, spacing=(1, 1, 1), suv=suv, min_component_suvmax=3.0)
    assert out[1:3, 1:3, 1:3].all() and not out[6:8, 6:8, 6:8].any()
    with pytest.raises(ValueError, match="SUV"):
        metrics.postprocess_mask(mask, spacing=(1, 1, 1), min_component_suvmax=3.0)


def test_postprocess_counts_equal_postprocess_mask_for_every_combination():
    rng = np.random.default_rng(0)
    prob = rng.random((16, 14, 12))
    suv = rng.uniform(0, 6, prob.shape)
    ref = np.zeros(prob.shape, bool)
    ref[3:7, 3:7, 3:7] = True
    grid = {"threshold": (0.5, 0.8), "suv_floor": (0.0, 2.0), "min_component_ml": (0.0, 0.01),
            "min_component_suvmax": (0.0, 5.0)}
    counts = metrics.postprocess_counts(prob, ref, suv, (2.0, 2.0, 3.0), grid)
    for i, thr in enumerate(grid["threshold"]):
        for j, floor in enumerate(grid["suv_floor"]):
            for k, min_ml in enumerate(grid["min_component_ml"]):
                for m, min_suvmax in enumerate(grid["min_component_suvmax"]):
                    pred = metrics.postprocess_mask(prob > thr, spacing=(2.0, 2.0, 3.0), suv=suv,
                                                    suv_floor=floor, min_component_ml=min_ml,
                                                    min_component_suvmax=min_suvmax)
                    tp = (pred & ref).sum()
                    assert list(counts[i, j, k, m]) == [tp, pred.sum() - tp, ref.sum() - tp]


def test_choose_postprocessing_takes_the_best_pooled_dice_and_the_stricter_tie():
    grid = {"threshold": (0.3, 0.5), "suv_floor": (0.0,), "min_component_ml": (0.0, 0.1),
            "min_component_suvmax": (0.0,)}
    counts = np.zeros((2, 1, 2, 1, 3), np.int64)
    counts[0, 0, 0, 0] = (10, 30, 0)  # Dice 2 TP / (2 TP + FP + FN) = 20 / 50 = 0.4
    counts[0, 0, 1, 0] = (10, 10, 0)  # 20 / 30 = 0.667
    counts[1, 0, 0, 0] = (9, 9, 1)    # 18 / 28 = 0.643
    counts[1, 0, 1, 0] = (10, 10, 0)  # 0.667, a tie with [0, 0, 1]: the stricter (later) wins
    chosen, dice = metrics.choose_postprocessing(counts[None], grid)  # one study
    assert dice == pytest.approx(2 / 3)
    assert chosen == {"threshold": 0.5, "suv_floor": 0.0, "min_component_ml": 0.1,
                      "min_component_suvmax": 0.0}


def test_pp_objectives_pooled_against_mean_of_studies_hand_computed():
    # two combinations (min_component_ml 0 or 0.1) on three validation studies: a large lesion,
    # a small lesion that the 0.1 ml filter deletes, and a tumour-free study
    grid = {"threshold": (0.5,), "suv_floor": (0.0,), "min_component_ml": (0.0, 0.1),
            "min_component_suvmax": (0.0,)}
    counts = np.zeros((3, 1, 1, 2, 1, 3), np.int64)
    counts[0, 0, 0, 0, 0] = (100, 40, 0)  # large lesion, unfiltered: 200 / 240
    counts[0, 0, 0, 1, 0] = (100, 20, 0)  # filtered: 200 / 220
    counts[1, 0, 0, 0, 0] = (2, 0, 0)     # small lesion found: Dice 1
    counts[1, 0, 0, 1, 0] = (0, 0, 2)     # deleted: Dice 0
    counts[2, 0, 0, 0, 0] = (0, 30, 0)    # tumour-free study: 30 false-positive voxels
    counts[2, 0, 0, 1, 0] = (0, 0, 0)
    pooled = metrics.postprocess_objective(counts, "pooled_dice")
    assert pooled[0, 0, 0, 0] == pytest.approx(204 / (204 + 70))
    assert pooled[0, 0, 1, 0] == pytest.approx(200 / (200 + 20 + 2))
    mean = metrics.postprocess_objective(counts, "mean_dice")  # tumour studies 0 and 1 only
    assert mean[0, 0, 0, 0] == pytest.approx((200 / 240 + 1) / 2)
    assert mean[0, 0, 1, 0] == pytest.approx((200 / 220 + 0) / 2)
    assert metrics.choose_postprocessing(counts, grid, "pooled_dice")[0]["min_component_ml"] == 0.1
    assert metrics.choose_postprocessing(counts, grid, "mean_dice")[0]["min_component_ml"] == 0.0
    with pytest.raises(ValueError, match="at least one validation study with tumour"):
        metrics.postprocess_objective(counts[2:], "mean_dice")
    with pytest.raises(ValueError, match="pp_objective"):
        metrics.postprocess_objective(counts, "median_dice")


def test_pp_objective_mean_dice_within_a_false_positive_volume_hand_computed():
    # the three studies above (large lesion, small lesion, tumour-free) plus a second
    # tumour-free study on a coarser grid; two combinations: min_component_ml 0 or 0.1
    grid = {"threshold": (0.5,), "suv_floor": (0.0,), "min_component_ml": (0.0, 0.1),
            "min_component_suvmax": (0.0,)}
    counts = np.zeros((4, 1, 1, 2, 1, 3), np.int64)
    counts[0, 0, 0, 0, 0] = (100, 40, 0)  # 200 / 240
    counts[0, 0, 0, 1, 0] = (100, 20, 0)  # 200 / 220
    counts[1, 0, 0, 0, 0] = (2, 0, 0)     # Dice 1
    counts[1, 0, 0, 1, 0] = (0, 0, 2)     # Dice 0
    counts[2, 0, 0, 0, 0] = (0, 30, 0)    # tumour-free, 0.05 ml voxels: 1.5 ml
    counts[2, 0, 0, 1, 0] = (0, 4, 0)     # 0.2 ml
    counts[3, 0, 0, 0, 0] = (0, 5, 0)     # tumour-free, 0.2 ml voxels: 1.0 ml
    counts[3, 0, 0, 1, 0] = (0, 0, 0)     # 0 ml
    voxel_ml = [0.008, 0.008, 0.05, 0.2]
    fpv = metrics.tumour_free_fpv_ml(counts, voxel_ml)
    assert fpv[0, 0, 0, 0] == pytest.approx((1.5 + 1.0) / 2)
    assert fpv[0, 0, 1, 0] == pytest.approx((0.2 + 0.0) / 2)
    mean_dice = ((200 / 240 + 1) / 2, (200 / 220 + 0) / 2)
    # a limit both meet: the mean Dice decides (no filter, like mean_dice)
    score = metrics.postprocess_objective(counts, "mean_dice_fpv", voxel_ml, max_fpv_ml=1.25)
    assert score[0, 0, :, 0] == pytest.approx(mean_dice)
    chosen, best = metrics.choose_postprocessing(counts, grid, "mean_dice_fpv", voxel_ml, 1.25)
    assert chosen["min_component_ml"] == 0.0 and best == pytest.approx(mean_dice[0])
    # a limit only the filter meets: it is chosen although its mean Dice is lower
    score = metrics.postprocess_objective(counts, "mean_dice_fpv", voxel_ml, max_fpv_ml=1.0)
    assert score[0, 0, :, 0] == pytest.approx((-1.25, mean_dice[1]))
    chosen, best = metrics.choose_postprocessing(counts, grid, "mean_dice_fpv", voxel_ml, 1.0)
    assert chosen["min_component_ml"] == 0.1 and best == pytest.approx(mean_dice[1])
    # a limit nothing meets: the lowest volume, scored as minus that volume
    chosen, best = metrics.choose_postprocessing(counts, grid, "mean_dice_fpv", voxel_ml, 0.05)
    assert chosen["min_component_ml"] == 0.1 and best == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="voxel_ml"):
        metrics.postprocess_objective(counts, "mean_dice_fpv")
    with pytest.raises(ValueError, match="one volume per study"):
        metrics.postprocess_objective(counts, "mean_dice_fpv", voxel_ml[:3])
    with pytest.raises(ValueError, match="without tumour"):
        metrics.postprocess_objective(counts[:2], "mean_dice_fpv", voxel_ml[:2])
    with pytest.raises(ValueError, match="with tumour"):
        metrics.postprocess_objective(counts[2:], "mean_dice_fpv", voxel_ml[2:])


# ---- paired comparison of two configurations over the same studies ------------------------

def test_paired_comparison_hand_computed():
    # d = a - b = (1, -2, 3, 4, 5): no zeros, no ties, so the exact null distribution of the
    # signed-rank statistic: T- = 2 (the rank of |-2|); rank subsets of {1..5} with sum <= 2
    # are {}, {1}, {2}: P(T <= 2) = 3 / 32, two-sided p = 6 / 32
    r = metrics.paired_comparison([1.0, -2.0, 3.0, 4.0, 5.0], [0.0] * 5, n_bootstrap=2000)
    assert (r["n"], r["n_dropped"]) == (5, 0)
    assert math.isclose(r["mean_diff"], 2.2) and math.isclose(r["mean_a"] - r["mean_b"], 2.2)
    assert math.isclose(r["wilcoxon_p"], 6 / 32)
    # all differences of one sign: T- = 0, p = 2 / 32
    assert math.isclose(metrics.paired_comparison([2, 3, 4, 5, 6], [1] * 5)["wilcoxon_p"], 2 / 32)
    # d = (0, 1): a bootstrap mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5 / 97.5 percentiles of 10,000 resamples are 0 and 1
    assert metrics.paired_comparison([0.0, 1.0], [0.0, 0.0])["ci95"] == [0.0, 1.0]
    # a constant difference: the interval is that value
    assert metrics.paired_comparison([0.3, 0.5, 0.9], [0.1, 0.3, 0.7])["ci95"] == \
        pytest.approx([0.2, 0.2])


def test_paired_comparison_against_scipy_nan_zeros_and_seed():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(3)
    a = rng.random(25)
    b = a + rng.normal(0.05, 0.1, 25)
    b[:6] = a[:6]  # six zero differences (both configurations scored a study alike)
    a[7], b[9] = np.nan, np.nan  # two pairs without a value: dropped, counted
    r = metrics.paired_comparison(a, b, n_bootstrap=500, seed=4)
    keep = np.isfinite(a) & np.isfinite(b)
    assert (r["n"], r["n_dropped"]) == (23, 2)
    assert math.isclose(r["mean_diff"], float(np.mean(a[keep] - b[keep])))
    expected = wilcoxon(a[keep] - b[keep], zero_method="pratt").pvalue
    assert r["zero_method"] == "pratt" and math.isclose(r["wilcoxon_p"], expected)
    assert r["ci95"][0] <= r["mean_diff"] <= r["ci95"][1]
    assert metrics.paired_comparison(a, b, n_bootstrap=500, seed=4) == r  # seeded
    assert metrics.paired_comparison(a, b, n_bootstrap=500, seed=5)["ci95"] != r["ci95"]
    same = metrics.paired_comparison([0.0, 0.0, 1.0], [0.0, 0.0, 1.0])
    assert same["wilcoxon_p"] == 1.0 and same["mean_diff"] == 0.0  # no difference at all
    empty = metrics.paired_comparison([np.nan], [1.0])
    assert empty["n"] == 0 and math.isnan(empty["wilcoxon_p"]) and empty["ci95"] is None
    with pytest.raises(ValueError, match="one length"):
        metrics.paired_comparison([1.0, 2.0], [1.0])


def test_counts_above_equals_thresholding_each_candidate():
    rng = np.random.default_rng(3)
    prob = rng.random((12, 10, 6))
    prob.flat[:4] = [0.05, 0.5, 0.95, 0.0]  # exactly on candidates: prob > t is strict
    ref = rng.random(prob.shape) > 0.6
    expected = np.array([[np.sum((prob > t) & ref), np.sum((prob > t) & ~ref),
                          np.sum((prob <= t) & ref)] for t in metrics.THRESHOLD_CANDIDATES])
    np.testing.assert_array_equal(metrics.counts_above(prob, ref), expected)
    np.testing.assert_array_equal(metrics.counts_above(prob, ref, (0.5,)), expected[[9]])
    with pytest.raises(ValueError, match="ascending"):
        metrics.counts_above(prob, ref, (0.5, 0.3))


def test_postprocess_grid_replaces_only_the_threshold_axis():
    grid = metrics.postprocess_grid([0.5, 0.9])
    assert grid["threshold"] == (0.5, 0.9)
    assert {k: v for k, v in grid.items() if k != "threshold"} == \
        {k: v for k, v in metrics.POSTPROCESS_GRID.items() if k != "threshold"}
    assert metrics.POSTPROCESS_GRID["threshold"] == (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
