"""bench/fp_by_organ.py: false positives attributed to organs, on hand-made volumes and on the
masks a tiny run's evaluation wrote."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def fp_module():
    return load_bench("fp_by_organ")


def test_false_positives_go_to_the_nearest_organ_within_reach(fp_module):
    shape = (20, 20, 20)
    organs = np.zeros(shape, np.uint8)
    organs[2:5, 2:5, 2:5] = 3  # kidney
    organs[10:14, 10:14, 10:14] = 6  # bladder
    ref = np.zeros(shape, bool)
    ref[15:17, 2:4, 2:4] = True  # a lesion (8 voxels)
    pred = np.zeros(shape, bool)
    pred[3, 3, 3] = True  # FP inside the kidney
    pred[6, 3, 3] = True  # FP 2 voxels beyond the kidney: within reach 2 (its own component)
    pred[12:14, 12:14, 12] = True  # FP in the bladder, 4 voxels, one component
    pred[2, 17, 17] = True  # FP far from every organ -> "none"
    pred[15:17, 2:4, 2:4] = True  # the lesion found ...
    pred[17, 2, 2] = True  # ... with one voxel too many: part of a true positive, not an FP
    volume, comps = fp_module.study_fp(pred, ref, organs, voxel_ml=0.5, reach=2)
    assert volume[3] == pytest.approx(2 * 0.5)
    assert volume[6] == pytest.approx(4 * 0.5)
    assert volume[0] == pytest.approx(0.5)  # the far voxel
    assert volume.sum() == pytest.approx(7 * 0.5)
    assert comps[3] == 2 and comps[6] == 1 and comps[0] == 1 and comps.sum() == 4
    # reach 1: the voxel 2 beyond the kidney is "none" now
    volume, comps = fp_module.study_fp(pred, ref, organs, voxel_ml=0.5, reach=1)
    assert volume[3] == pytest.approx(0.5) and volume[0] == pytest.approx(1.0)
    assert comps[3] == 1 and comps[0] == 2


def test_the_table_of_a_tiny_run_adds_up_to_its_evaluation(tmp_path, fp_module):
    import main

    main.main(["--preset=tiny", f"--out_dir={tmp_path / 'runs'}", "--run_name=fp",
               f"--cache_dir={tmp_path / 'cache'}", "--save_overlays=False"])
    run_dir = tmp_path / "runs" / "fp"
    result = fp_module.analyse(run_dir)
    with open(run_dir / "eval" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    free = [float(r["fpv_ml"]) for r in rows if r["has_tumor"] == "False"]
    tumour = [float(r["fpv_ml"]) for r in rows if r["has_tumor"] == "True"]
    assert (result["n_free"], result["n_tumour"]) == (len(free), len(tumour))
    assert sum(r["fpv_ml_free"] for r in result["rows"]) == pytest.approx(np.mean(free))
    assert sum(r["fpv_ml_tumour"] for r in result["rows"]) == pytest.approx(np.mean(tumour))
    comps = sum(int(r["n_fp_components"]) for r in rows if r["has_tumor"] == "False")
    assert sum(r["fp_components_free"] for r in result["rows"]) == comps
    text = fp_module.to_markdown(result)
    assert "| **all** |" in text and not math.isnan(result["rows"][0]["fpv_ml_free"])
    fp_module.main([f"--run_dir={run_dir}", f"--out={tmp_path / 'fp.md'}"])
    assert (tmp_path / "fp.md").read_text() == text
    # a run whose recorded cache is gone (bench/main_run.py's temporary one): --cache_dir
    # prepares its studies in the folder given, with the same result
    other = tmp_path / "other-cache"
    fp_module.main([f"--run_dir={run_dir}", f"--cache_dir={other}", f"--out={tmp_path / 'fp2.md'}"])
    assert (tmp_path / "fp2.md").read_text() == text
    assert any((other / "phantom").iterdir())
