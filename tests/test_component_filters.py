"""bench/component_filters.py: component features and filter choice on hand-made volumes, and
the unfiltered row of a tiny run against that run's own evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def cf():
    return load_bench("component_filters")


def _volumes():
    shape = (12, 12, 6)
    mask = np.zeros(shape, bool)
    ref = np.zeros(shape, bool)
    prob = np.zeros(shape, np.float32)
    ct = np.zeros(shape, np.float32)
    mask[1:3, 1:3, 1] = True  # component 1: 4 voxels, 2 of them tumour, confident, soft tissue
    ref[1:3, 1, 1] = True
    ref[8, 8, 4] = True  # a lesion nobody found
    prob[1:3, 1:3, 1] = 0.97
    prob[1, 1, 1] = 0.999
    ct[1:3, 1:3, 1] = 40.0
    mask[6, 6:9, 3] = True  # component 2: 3 voxels, no tumour, confident, fat (-80, -90, -100)
    prob[6, 6:9, 3] = 0.995
    ct[6, 6:9, 3] = (-80.0, -90.0, -100.0)
    mask[10, 1, 5] = True  # component 3: 1 voxel, no tumour, unsure, soft tissue
    prob[10, 1, 5] = 0.85
    ct[10, 1, 5] = 30.0
    return mask, ref, prob, ct


def test_component_features_are_hand_computed(cf):
    mask, ref, prob, ct = _volumes()
    f = cf.component_features(mask, ref, prob, ct)
    assert f["voxels"].tolist() == [4, 3, 1]
    assert f["tumour_voxels"].tolist() == [2, 0, 0]
    assert f["prob_max"] == pytest.approx([0.999, 0.995, 0.85], abs=1e-6)
    assert f["ct_mean_hu"] == pytest.approx([40.0, -90.0, 30.0])
    n_ref = int(ref.sum())  # 3
    assert cf.kept_counts(f, n_ref, "", 0.0) == (2, 6, 1)
    assert cf.kept_counts(f, n_ref, "prob_max", 0.9) == (2, 5, 1)  # the unsure voxel dropped
    assert cf.kept_counts(f, n_ref, "ct_mean_hu", -60.0) == (2, 3, 1)  # the fat blob dropped
    assert cf.kept_counts(f, n_ref, "prob_max", 0.9999) == (0, 0, 3)
    empty = cf.component_features(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4)), np.zeros((4, 4, 4)),
                                  np.zeros((4, 4, 4)))
    assert cf.kept_counts(empty, 0, "ct_mean_hu", -30.0) == (0, 0, 0)


def test_core_density_is_read_on_the_hot_core_and_filtered_as_a_fat_window(cf):
    mask, ref, prob, ct = _volumes()
    suv = np.zeros(mask.shape, np.float32)
    suv[1:3, 1:3, 1] = ((10.0, 8.0), (6.0, 2.0))  # core >= 7: the 10 and 8 voxels (40 HU)
    ct[2, 2, 1] = -100.0  # the cold edge of the lesion reaches into fat: outside the core
    suv[6, 6:9, 3] = (5.0, 4.0, 3.0)  # core >= 3.5: -80 and -90 HU
    suv[10, 1, 5] = 2.0
    f = cf.component_features(mask, ref, prob, ct, suv=suv)
    assert f["ct_mean_hu"] == pytest.approx([(40.0 * 3 - 100.0) / 4, -90.0, 30.0])
    assert f["ct_core_hu"] == pytest.approx([40.0, -85.0, 30.0])
    assert "ct_core_hu" not in cf.component_features(mask, ref, prob, ct)
    n_ref = int(ref.sum())
    # the window [-190, cut] drops the brown-fat-like blob at every cut and nothing else ...
    for cut in cf.FILTERS["ct_core_hu"]:
        assert cf.kept_counts(f, n_ref, "ct_core_hu", cut) == (2, 3, 1)
    # ... keeps a lung-dense core (below -190 HU) and drops a core at the cut itself
    f["ct_core_hu"] = np.array([-400.0, -10.0, 30.0])
    assert cf.kept_counts(f, n_ref, "ct_core_hu", -10.0) == (2, 3, 1)
    assert cf.kept_counts(f, n_ref, "ct_core_hu", -30.0) == (2, 6, 1)
    empty = cf.component_features(*(np.zeros((4, 4, 4)),) * 4, suv=np.zeros((4, 4, 4)))
    assert empty["ct_core_hu"].shape == (0,)


def test_aux_background_feature_is_the_component_mean(cf):
    mask, ref, prob, ct = _volumes()
    aux = np.full(mask.shape, 0.5, np.float32)
    aux[1:3, 1:3, 1] = ((0.9, 0.7), (0.8, 0.6))  # component 1 (the lesion): mean 0.75
    aux[6, 6:9, 3] = (0.05, 0.1, 0.15)  # component 2 (the fat blob): the head calls it organ
    aux[10, 1, 5] = 0.3
    f = cf.component_features(mask, ref, prob, ct, aux)
    assert f["aux_background"] == pytest.approx([0.75, 0.1, 0.3])
    assert "aux_background" not in cf.component_features(mask, ref, prob, ct)
    n_ref = int(ref.sum())
    assert cf.kept_counts(f, n_ref, "aux_background", 0.25) == (2, 3, 1)  # the blob dropped
    assert cf.kept_counts(f, n_ref, "aux_background", 0.5) == (2, 2, 1)  # and the 0.3 voxel
    assert cf.kept_counts(f, n_ref, "aux_background", 0.8) == (0, 0, 3)
    # pooled Dice: none 4/11, 0.1 keeps all (the blob's mean is 0.1), 0.25 4/8, 0.5 4/7,
    # 0.75 keeps the lesion (its mean is exactly 0.75) 4/7: the tie goes to the stricter 0.75
    chosen, scores = cf.choose_cut([(f, n_ref)], "aux_background")
    assert scores[0.1] == pytest.approx(4 / 11) and scores[0.25] == pytest.approx(4 / 8)
    assert scores[0.5] == pytest.approx(4 / 7) and scores[0.75] == pytest.approx(4 / 7)
    assert chosen == 0.75


def test_the_cut_is_chosen_on_pooled_dice_with_ties_to_the_stricter(cf):
    mask, ref, prob, ct = _volumes()
    f = cf.component_features(mask, ref, prob, ct)
    val = [(f, int(ref.sum()))]
    # no filter: 2*2 / (4 + 6 + 1) = 4/11; -100 keeps the fat blob (its mean -90 >= -100),
    # -60 and -30 drop it -> 4 / (4 + 3 + 1) = 4/8
    chosen, scores = cf.choose_cut(val, "ct_mean_hu")
    assert scores[0.0] == pytest.approx(4 / 11)
    assert scores[-100.0] == pytest.approx(4 / 11)
    assert scores[-60.0] == pytest.approx(4 / 8) and scores[-30.0] == pytest.approx(4 / 8)
    assert chosen == -30.0  # the tie between -60 and -30 goes to the stricter cut
    # prob_max: every cut 0.9 ... 0.99 drops the unsure voxel only (the others reach >= 0.995):
    # 4 / (4 + 5 + 1)
    chosen, scores = cf.choose_cut(val, "prob_max")
    assert scores[0.9] == pytest.approx(4 / 10) and scores[0.99] == pytest.approx(4 / 10)
    assert chosen == 0.99


def test_the_unfiltered_row_is_the_runs_own_evaluation(tmp_path, cf):
    import main

    main.main(["--preset=tiny", f"--out_dir={tmp_path / 'runs'}", "--run_name=cf",
               f"--cache_dir={tmp_path / 'cache'}", "--save_overlays=False",
               "--tune_postprocess=True"])
    run_dir = tmp_path / "runs" / "cf"
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    scored = summary.get("postprocessed", summary)
    result = cf.analyse(run_dir, None)
    none = result["filters"][0]
    assert none["filter"].startswith("none")
    assert none["test_dice"] == pytest.approx(scored["metrics"]["dice"]["mean"], nan_ok=True)
    assert none["test_fpv_ml_tumor_free"] == pytest.approx(
        scored["metrics"]["fpv_ml_tumor_free"]["mean"], nan_ok=True)
    assert none["lesion_recall"] == pytest.approx(scored["lesions"]["recall"], nan_ok=True)
    assert [r["filter"] for r in result["filters"][1:]] == \
        ["prob_max"] * 4 + ["ct_mean_hu"] * 3 + ["ct_core_hu"] * 3
    for row in result["filters"][1:]:  # dropping components never adds a false positive or a find
        assert row["test_fpv_ml_tumor_free"] <= none["test_fpv_ml_tumor_free"] + 1e-12
        assert row["lesion_recall"] <= none["lesion_recall"] + 1e-12
    text = cf.to_markdown(result)
    cf.main([f"--run_dir={run_dir}", f"--out={tmp_path / 'cf.md'}"])
    assert (tmp_path / "cf.md").read_text() == text


def test_runs_with_an_organ_head_get_the_aux_filter(tmp_path, cf):
    import main

    main.main(["--preset=tiny", f"--out_dir={tmp_path / 'runs'}", "--run_name=org",
               f"--cache_dir={tmp_path / 'cache'}", "--save_overlays=False",
               "--tune_postprocess=True", "--aux_target=organs"])
    result = cf.analyse(tmp_path / "runs" / "org", None)
    assert result["aux_target"] == "organs"
    names = [r["filter"] for r in result["filters"][1:]]
    assert names == ["prob_max"] * 4 + ["ct_mean_hu"] * 3 + ["ct_core_hu"] * 3 + \
        ["aux_background"] * 4
    none = result["filters"][0]
    for row in result["filters"][1:]:
        assert row["test_fpv_ml_tumor_free"] <= none["test_fpv_ml_tumor_free"] + 1e-12
    assert result["chosen_on_validation"]["aux_background"] in (0.0, *cf.FILTERS["aux_background"])
    quantiles = result["features"]["aux_background"]
    assert all(0.0 <= q <= 1.0 for q in quantiles["tp_quantiles"] + quantiles["fp_quantiles"])
    assert "| aux_background |" in cf.to_markdown(result)
