"""quantification: MTV, SUVmax/mean/peak, TLG, Dmax, the lesion table and cohort agreement, on
hand-made volumes whose answers are known (docs/evaluation.md, "PET quantification")."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, stats

import quantification as q

ROOT = Path(__file__).resolve().parents[1]
NAN_KEYS = ("suvmax", "suvmean", "suvpeak", "dmax_mm")


def ball(shape, centre, radius_mm, spacing):
    """Voxels whose centres lie within radius_mm of `centre` (voxel indices), in mm."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing)) <= radius_mm ** 2


def brute_force_suvpeak(suv, mask, spacing, radius=q.SUVPEAK_RADIUS_MM):
    """The definition, literally: for each mask voxel, the mean SUV of every image voxel whose
    centre is within `radius` mm (distances over the whole image, no kernel, no box)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(suv.shape, spacing)),
                                indexing="ij"), -1)  # (X, Y, Z, 3) mm
    best = -np.inf
    for v in np.argwhere(mask):
        inside = ((grid - np.asarray(v) * np.asarray(spacing)) ** 2).sum(-1) <= radius ** 2
        best = max(best, float(suv[inside].mean()))
    return best


# ---- the 1 ml sphere ---------------------------------------------------------------------

def test_kernel_voxel_count_matches_a_hand_count_for_anisotropic_spacing():
    # spacing (2, 2, 3) mm, r = 6.2 mm, r^2 = 38.44:
    # offsets (a, b, c) with 4a^2 + 4b^2 + 9c^2 <= 38.44
    #   c = 0:  a^2 + b^2 <= 9    -> 29 points (7 + 2*5 + 2*5 + 2*1)
    #   c = ±1: a^2 + b^2 <= 7    -> 21 each (5 + 2*5 + 2*3)
    #   c = ±2: a^2 + b^2 <= 0    -> 1 each
    kernel = q.sphere_kernel((2.0, 2.0, 3.0))
    assert kernel.shape == (7, 7, 5)
    assert [int(kernel[:, :, k].sum()) for k in range(5)] == [1, 21, 29, 21, 1]
    assert kernel.sum() == 73
    # isotropic 1 mm: the integer points of a ball of radius 6.2, counted without the kernel
    r = np.arange(-7, 8)
    a, b, c = np.meshgrid(r, r, r, indexing="ij")
    assert q.sphere_kernel((1.0, 1.0, 1.0)).sum() == int((a ** 2 + b ** 2 + c ** 2 <= 38.44).sum())
    # the axis order matters: (3, 2, 2) is the same sphere with the long axis first
    assert q.sphere_kernel((3.0, 2.0, 2.0)).shape == (5, 7, 7)


def test_uniform_sphere_gives_suvpeak_equal_to_its_suv():
    spacing = (2.0, 2.0, 3.0)
    shape = (40, 40, 30)
    lesion = ball(shape, (20, 20, 15), 16.0, spacing)  # radius 16 mm >> 6.2 mm
    suv = np.where(lesion, 7.5, 1.0).astype(np.float32)
    out = q.quantify(suv, lesion, spacing)
    assert out["suvpeak"] == pytest.approx(7.5, abs=1e-9)
    assert out["suvmax"] == out["suvmean"] == pytest.approx(7.5)


def test_suvpeak_is_the_mean_of_the_sphere_not_the_hottest_voxel():
    # one hot voxel in a uniform lesion: the best sphere is centred on it and holds the
    # other 72 voxels of the 73-voxel kernel at SUV 1 -> (100 + 72) / 73
    spacing = (2.0, 2.0, 3.0)
    suv = np.ones((30, 30, 20), np.float32)
    mask = np.zeros(suv.shape, bool)
    mask[10:20, 10:20, 5:15] = True
    suv[15, 14, 9] = 100.0
    assert q.suvpeak(suv, mask, spacing) == pytest.approx((100 + 72) / 73)
    # the sphere may extend beyond the mask: centred on a mask voxel next to a hot voxel
    # outside it, the hot voxel counts
    small = np.zeros(suv.shape, bool)
    small[15, 14, 10] = True  # 3 mm from the hot voxel
    assert q.suvpeak(suv, small, spacing) == pytest.approx((100 + 72) / 73)


def test_suvpeak_near_the_border_uses_only_voxels_inside_the_image():
    spacing = (2.0, 2.0, 3.0)
    suv = np.full((12, 12, 10), 3.0, np.float32)
    mask = np.zeros(suv.shape, bool)
    mask[0, 0, 0] = True  # a corner: most of the sphere is outside the image
    # counting the outside as SUV 0 would give 3 * (in-image voxels) / 73 < 3
    assert q.suvpeak(suv, mask, spacing) == pytest.approx(3.0, abs=1e-12)
    # a corner sphere holds the kernel's octant: offsets a, b, c >= 0
    kernel = q.sphere_kernel(spacing)
    octant = int(kernel[3:, 3:, 2:].sum())
    suv[1, 0, 0] = 3.0 + octant  # raises that sphere's mean by exactly 1
    assert q.suvpeak(suv, mask, spacing) == pytest.approx(4.0)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("spacing", [(2.0, 2.0, 3.0), (1.0, 1.5, 4.0), (4.0, 4.0, 4.0)])
def test_suvpeak_matches_the_definition_computed_by_brute_force(monkeypatch, path, spacing):
    # both ways of evaluating the convolution (gathered at the mask's voxels, or the dense box)
    monkeypatch.setattr(q, "DENSE_ABOVE_FILL", 1e-9 if path == "sparse" else 1e9)
    rng = np.random.default_rng(hash(spacing) % 2 ** 32)
    suv = rng.gamma(2.0, 1.5, (11, 9, 7)).astype(np.float32)
    for mask in (rng.random(suv.shape) > 0.93,                 # scattered, touching borders
                 ball(suv.shape, (5, 4, 3), 4.5, spacing)):     # compact, in the middle
        expected = brute_force_suvpeak(suv, mask, spacing)
        assert q.suvpeak(suv, mask, spacing) == pytest.approx(expected, rel=1e-6)
        means = q.sphere_means_at(suv, mask, spacing)
        dense, box = q.local_sphere_mean(suv, mask, spacing)
        np.testing.assert_allclose(means, dense[mask[box]], rtol=1e-6)


# ---- per-study quantities --------------------------------------------------------------------

def test_a_voxel_above_the_cache_clip_shows_up_in_suvmax():
    spacing = (2.0, 2.0, 3.0)
    suv = np.ones((20, 20, 20), np.float32)
    mask = np.zeros(suv.shape, bool)
    mask[5:10, 5:10, 5:10] = True
    suv[mask] = 8.0
    suv[7, 7, 7] = 37.5  # above suv_max = 20, where the training cache clips
    out = q.quantify(suv, mask, spacing)
    assert out["suvmax"] == 37.5
    assert out["suvmean"] == pytest.approx((124 * 8.0 + 37.5) / 125)


def test_mtv_tlg_and_suvmean_follow_their_definitions():
    rng = np.random.default_rng(0)
    spacing = (2.0, 2.0, 3.0)  # voxel volume 12 mm^3 = 0.012 ml
    suv = rng.uniform(0.5, 12.0, (16, 14, 12)).astype(np.float32)
    mask = rng.random(suv.shape) > 0.8
    out = q.quantify(suv, mask, spacing)
    n = int(mask.sum())
    assert out["mtv_ml"] == pytest.approx(n * 0.012)
    assert out["suvmean"] == pytest.approx(float(suv[mask].astype(np.float64).mean()))
    assert out["tlg"] == pytest.approx(out["suvmean"] * out["mtv_ml"], rel=1e-12)
    assert out["tlg"] == pytest.approx(float(suv[mask].astype(np.float64).sum()) * 0.012)
    assert out["suvmax"] == float(suv[mask].max())


def test_anisotropic_spacing_scales_mtv_and_tlg_by_the_voxel_volume():
    suv = np.full((10, 10, 10), 2.0, np.float32)
    mask = np.zeros(suv.shape, bool)
    mask[2:5, 2:6, 3:8] = True  # 60 voxels
    iso, aniso = q.quantify(suv, mask, (1, 1, 1)), q.quantify(suv, mask, (2.0, 2.0, 3.0))
    assert iso["mtv_ml"] == pytest.approx(0.060)
    assert aniso["mtv_ml"] == pytest.approx(60 * 0.012)
    assert aniso["tlg"] == pytest.approx(2.0 * 60 * 0.012)
    assert q.voxel_ml((2.04, 2.04, 3.0)) == pytest.approx(2.04 * 2.04 * 3.0 / 1000)


def test_empty_mask_gives_zero_volume_and_nan_elsewhere():
    suv = np.ones((8, 8, 8), np.float32)
    out = q.quantify(suv, np.zeros(suv.shape, bool), (2.0, 2.0, 3.0))
    assert out["mtv_ml"] == 0.0 and out["tlg"] == 0.0
    for key in NAN_KEYS:
        assert math.isnan(out[key]), key
    assert math.isnan(q.suvpeak(suv, np.zeros(suv.shape), (1, 1, 1)))
    assert math.isnan(q.dmax_mm(np.zeros(suv.shape), (1, 1, 1)))


def test_study_columns_are_exactly_the_documented_ones():
    suv = np.ones((8, 8, 8), np.float32)
    ref = np.zeros(suv.shape, bool)
    ref[2:4, 2:4, 2:4] = True
    cols = q.study_columns(suv, np.zeros(suv.shape, bool), ref, (1, 1, 1))
    assert list(cols) == ["suvmax_pred", "suvmax_ref", "suvmean_pred", "suvmean_ref",
                          "suvpeak_pred", "suvpeak_ref", "mtv_ml_pred", "mtv_ml_ref",
                          "tlg_pred", "tlg_ref", "dmax_mm_pred", "dmax_mm_ref"]
    assert list(cols) == list(q.STUDY_COLUMNS)
    assert cols["mtv_ml_pred"] == 0.0 and math.isnan(cols["suvmax_pred"])
    assert cols["mtv_ml_ref"] == pytest.approx(0.008) and cols["dmax_mm_ref"] == 0.0


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(ValueError, match="one shape"):
        q.quantify(np.ones((4, 4, 4)), np.ones((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        q.quantify(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        q.quantify(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1, 0, 1))


# ---- Dmax ----------------------------------------------------------------------------------

def test_dmax_of_two_lesions_at_a_known_distance():
    spacing = (2.0, 2.0, 3.0)
    mask = np.zeros((30, 20, 40), bool)
    mask[4:7, 4:7, 4:7] = True        # centroid (5, 5, 5)
    mask[9:12, 4:7, 24:27] = True     # centroid (10, 5, 25): 10 mm in x, 60 mm in z
    assert q.dmax_mm(mask, spacing) == pytest.approx(math.hypot(10.0, 60.0))
    assert q.quantify(np.ones(mask.shape), mask, spacing)["dmax_mm"] == pytest.approx(
        math.hypot(10.0, 60.0))
    # a third lesion between them does not change the farthest pair
    mask[6:8, 4:6, 14:16] = True
    assert q.dmax_mm(mask, spacing) == pytest.approx(math.hypot(10.0, 60.0))


def test_dmax_is_zero_for_one_lesion_and_uses_18_connectivity():
    spacing = (2.0, 2.0, 3.0)
    one = np.zeros((10, 10, 10), bool)
    one[2:6, 3:5, 1:8] = True
    assert q.dmax_mm(one, spacing) == 0.0
    edge = np.zeros((6, 6, 6), bool)
    edge[2, 2, 2] = edge[3, 3, 2] = True  # share an edge: one 18-connected lesion
    assert q.dmax_mm(edge, spacing) == 0.0
    corner = np.zeros((6, 6, 6), bool)
    corner[2, 2, 2] = corner[3, 3, 3] = True  # share only a corner: two lesions
    assert q.dmax_mm(corner, spacing) == pytest.approx(math.sqrt(2 ** 2 + 2 ** 2 + 3 ** 2))


def test_max_pairwise_distance_on_the_hull_equals_every_pair():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(1500, 3)) * [120, 80, 400]
    brute = q.max_pairwise_distance(points, hull_above=10 ** 9)
    assert q.max_pairwise_distance(points, hull_above=100) == pytest.approx(brute, rel=1e-12)
    flat = points.copy()
    flat[:, 2] = 7.0  # coplanar: no 3-D hull, every pair is compared instead
    assert q.max_pairwise_distance(flat, hull_above=100) == pytest.approx(
        q.max_pairwise_distance(flat, hull_above=10 ** 9))
    assert math.isnan(q.max_pairwise_distance(np.zeros((0, 3))))


# ---- per lesion -------------------------------------------------------------------------------

def two_lesion_study():
    spacing = (2.0, 2.0, 3.0)
    shape = (40, 30, 30)
    suv = np.ones(shape, np.float32)
    ref = np.zeros(shape, bool)
    big = ball(shape, (10, 15, 10), 14.0, spacing)   # labelled first (lower x)
    small = ball(shape, (30, 15, 20), 5.0, spacing)
    ref |= big | small
    suv[big], suv[small] = 6.0, 3.0
    suv[30, 15, 20] = 50.0
    return suv, ref, spacing, big, small


def test_lesion_table_rows_follow_scipy_label_order_and_measure_each_lesion():
    suv, ref, spacing, big, small = two_lesion_study()
    rows = q.lesion_table(suv, ref, spacing, detected=[True, False], case_id="PETCT_x")
    assert [r["lesion_id"] for r in rows] == [1, 2]
    labels, n = ndimage.label(ref, structure=ndimage.generate_binary_structure(3, 2))
    assert n == 2 and (labels == 1).sum() == big.sum()  # label 1 is the big lesion
    first, second = rows
    assert set(first) == set(q.LESION_COLUMNS)
    assert first["case_id"] == "PETCT_x" and first["detected"] is True
    assert second["detected"] is False
    assert first["volume_ml"] == pytest.approx(big.sum() * 0.012)
    assert second["volume_ml"] == pytest.approx(small.sum() * 0.012)
    assert first["suvmax"] == 6.0 and second["suvmax"] == 50.0
    assert first["suvpeak"] == pytest.approx(6.0)  # uniform and much larger than the sphere
    assert second["suvpeak"] == pytest.approx(brute_force_suvpeak(suv, small, spacing))
    assert first["tlg"] == pytest.approx(6.0 * first["volume_ml"])
    np.testing.assert_allclose([first["centroid_x"], first["centroid_y"], first["centroid_z"]],
                               ndimage.center_of_mass(big), atol=1e-9)
    np.testing.assert_allclose([second["centroid_x"], second["centroid_y"],
                                second["centroid_z"]], (30, 15, 20), atol=1e-9)


def test_lesion_table_without_detected_and_with_a_wrong_length():
    suv, ref, spacing, _, _ = two_lesion_study()
    assert all(r["detected"] is None for r in q.lesion_table(suv, ref, spacing))
    with pytest.raises(ValueError, match="2 18-connected lesions"):
        q.lesion_table(suv, ref, spacing, detected=[True], case_id="PETCT_x")
    assert q.lesion_table(suv, np.zeros(ref.shape), spacing, detected=[]) == []


def test_lesion_csv_holds_every_study_and_is_written_atomically(tmp_path):
    suv, ref, spacing, _, _ = two_lesion_study()
    rows = (q.lesion_table(suv, ref, spacing, [True, False], case_id="study a")
            + q.lesion_table(suv, ref, spacing, None, case_id="study b"))
    rows[0]["suvpeak"] = float("nan")
    path = q.write_lesion_csv(rows, tmp_path / "eval" / "lesions.csv")
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(q.LESION_COLUMNS)
    assert [(r["case_id"], r["lesion_id"]) for r in read] == [
        ("study a", "1"), ("study a", "2"), ("study b", "1"), ("study b", "2")]
    assert [r["detected"] for r in read] == ["True", "False", "", ""]
    assert read[0]["suvpeak"] == "nan" and float(read[1]["suvmax"]) == 50.0
    assert [p.name for p in path.parent.iterdir()] == ["lesions.csv"]  # no temporary left


# ---- agreement ----------------------------------------------------------------------------------

SHROUT_FLEISS_TABLE_2 = np.array([  # 6 targets x 4 judges (Shrout & Fleiss 1979, Table 2)
    [9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)


def test_icc_2_1_of_the_shrout_fleiss_example():
    # by hand: grand mean 29/6; MSR = 11.24, MSC = 32.49, MSE = 1.02 (rounded), so
    # ICC(2,1) = (11.24 - 1.02) / (11.24 + 3 * 1.02 + 4 * (32.49 - 1.02) / 6) = 0.29
    x = SHROUT_FLEISS_TABLE_2
    n, k = x.shape
    m = x.mean()
    msr = k * ((x.mean(1) - m) ** 2).sum() / (n - 1)
    msc = n * ((x.mean(0) - m) ** 2).sum() / (k - 1)
    mse = (((x - m) ** 2).sum() - (n - 1) * msr - (k - 1) * msc) / ((n - 1) * (k - 1))
    assert (round(msr, 2), round(msc, 2), round(mse, 2)) == (11.24, 32.49, 1.02)
    icc = q.icc_2_1(x)
    assert icc == pytest.approx((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n))
    assert round(icc, 2) == 0.29
    assert icc == pytest.approx(0.2898, abs=1e-4)


def test_icc_is_one_for_perfect_agreement_and_penalises_a_constant_bias():
    ref = [1.0, 4.0, 2.5, 10.0, 7.0]
    assert q.agreement(ref, ref)["icc_2_1"] == pytest.approx(1.0)
    shifted = q.agreement([v + 3 for v in ref], ref)
    assert shifted["spearman"] == pytest.approx(1.0)  # same ranks...
    assert shifted["icc_2_1"] < 0.9                    # ...but absolute agreement is lost
    assert shifted["bias"] == pytest.approx(3.0) and shifted["sd_diff"] == pytest.approx(0.0)
    assert math.isnan(q.icc_2_1(np.ones((4, 2))))  # no variance at all: undefined


def test_bland_altman_bias_and_limits_on_hand_numbers():
    # d = pred - ref = [1, 0, 1, -1]: bias 0.25, SD sqrt(2.75 / 3) = 0.957427
    out = q.agreement([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 2.0, 5.0])
    assert out["n"] == 4 and out["n_dropped"] == 0
    assert out["bias"] == pytest.approx(0.25)
    assert out["sd_diff"] == pytest.approx(math.sqrt(2.75 / 3))
    assert out["loa_low"] == pytest.approx(0.25 - 1.96 * math.sqrt(2.75 / 3))
    assert out["loa_high"] == pytest.approx(0.25 + 1.96 * math.sqrt(2.75 / 3))
    assert out["spearman"] == pytest.approx(stats.spearmanr([1, 2, 3, 4], [0, 2, 2, 5])[0])


def test_agreement_drops_nan_pairs_and_needs_three():
    out = q.agreement([1.0, float("nan"), 3.0, 4.0, None, 6.0],
                      [0.0, 2.0, 2.0, 5.0, 1.0, float("inf")])  # a NaN on either side
    assert (out["n"], out["n_dropped"]) == (3, 3)
    assert out["bias"] == pytest.approx(np.mean([1.0, 1.0, -1.0]))
    few = q.agreement([1.0, 2.0, float("nan")], [1.5, 2.5, 3.0])
    assert (few["n"], few["n_dropped"]) == (2, 1)
    for key in ("bias", "sd_diff", "loa_low", "loa_high", "icc_2_1", "spearman"):
        assert math.isnan(few[key]), key
    with pytest.raises(ValueError, match="one predicted and one reference"):
        q.agreement([1.0, 2.0], [1.0])


def cohort_rows():
    rng = np.random.default_rng(5)
    rows = []
    for i in range(12):
        ref = float(rng.uniform(1, 500))
        rows.append({"case_id": f"c{i}", "has_tumor": True, "mtv_ml_ref": ref,
                     "mtv_ml_pred": ref * float(rng.uniform(0.7, 1.3)), "tlg_ref": 4 * ref,
                     "tlg_pred": 4 * ref * float(rng.uniform(0.7, 1.3)),
                     "suvmax_ref": float(rng.uniform(3, 30)),
                     "suvmax_pred": float(rng.uniform(3, 30))})
    rows[3].update(mtv_ml_pred=0.0, tlg_pred=0.0, suvmax_pred=float("nan"))  # missed tumour
    rows.append({"case_id": "free", "has_tumor": False, "mtv_ml_ref": 0.0, "mtv_ml_pred": 9.0,
                 "tlg_ref": 0.0, "tlg_pred": 20.0, "suvmax_ref": float("nan"),
                 "suvmax_pred": 4.0})
    return rows


def test_cohort_agreement_uses_tumour_studies_only():
    rows = cohort_rows()
    out = q.cohort_agreement(rows)
    assert list(out) == ["mtv_ml", "tlg", "suvmax"]
    assert out["mtv_ml"]["n"] == 12 and out["mtv_ml"]["n_dropped"] == 0  # the missed one counts
    assert out["suvmax"]["n"] == 11 and out["suvmax"]["n_dropped"] == 1  # its SUVmax is NaN
    tumour = [r for r in rows if r["has_tumor"]]
    expected = q.agreement([r["tlg_pred"] for r in tumour], [r["tlg_ref"] for r in tumour])
    assert out["tlg"] == expected
    # rows read back from per_case.csv hold text
    as_text = [{k: str(v) for k, v in r.items()} for r in rows]
    assert q.cohort_agreement(as_text)["mtv_ml"]["bias"] == pytest.approx(out["mtv_ml"]["bias"])


def test_agreement_plots_are_written(tmp_path):
    paths = q.save_agreement_plots(cohort_rows(), tmp_path / "eval")
    assert [p.name for p in paths] == [q.BLAND_ALTMAN_PNG, q.SCATTER_PNG]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # no tumour study at all: the panel says so, nothing raises
    assert len(q.save_agreement_plots([], tmp_path / "empty", quantities=("mtv_ml",))) == 2
    # values over decades get a log axis, symlog when a zero is among them
    assert q._scale(np.array([0.5, 3.0, 900.0]))[0] == "log"
    assert q._scale(np.array([0.0, 0.5, 3.0, 900.0]))[0] == "symlog"
    assert q._scale(np.array([3.0, 9.0, 25.0]))[0] == "linear"


def test_imports_without_torch_or_project_modules():
    code = ("import json, sys; import quantification; "
            "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(__import__("json").loads(out.stdout.splitlines()[-1]))
    assert not loaded & {"torch", "matplotlib", "test", "training", "config", "data", "models"}
