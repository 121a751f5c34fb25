"""Smoke tests of bench/bench_cuda.py on the CPU with a tiny model (no timing is checked).

    python -m pytest tests/test_bench.py -q            # eager paths
    python -m pytest tests/test_bench.py -q -m slow    # + the torch.compile path (needs gcc)
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device=cpu", "--model=transunet_tiny", "--img_size=64", "--batch=2", "--amp=off"]


@pytest.fixture(scope="module")
def bench_cuda():
    return load_bench("bench_cuda")


def _rows(out: str) -> dict[str, float]:
    """{configuration label: images/s} from the speedup table."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(eager, SGD \(baseline\)|eager, fused AdamW|torch\.compile, fused AdamW)"
                     r"\s+(\d+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            rows[m[1]] = float(m[4])
    return rows


def test_speedup_suite_eager_on_cpu(bench_cuda, capsys):
    bench_cuda.main([*TINY, "--steps=1", "--warmup=1", "--no-compile"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"eager, SGD (baseline)", "eager, fused AdamW"}
    assert all(v > 0 for v in rows.values())
    assert "ratio eager, fused AdamW / baseline:" in out


def test_configs_and_cpu_limits(bench_cuda):
    configs = bench_cuda.speedup_configs(24, 64, compile=True)
    assert [(c["batch"], c["optimizer"], c["compile"]) for c in configs] == [
        (24, "sgd", False), (64, "adamw_fused", False), (64, "adamw_fused", True)]
    assert bench_cuda.parse_args(["--batch=2"]).baseline_batch is None  # -> min(24, 2) = 2
    with pytest.raises(SystemExit, match="needs CUDA"):
        bench_cuda.main(["--device=cpu", "--suite=models"])


@pytest.mark.slow  # inductor + gcc compile forward + backward: 245 s cold, 19 s with a warm cache (2 busy cores)
def test_speedup_suite_compile_path_on_cpu(bench_cuda, capsys):
    bench_cuda.main([*TINY, "--steps=1", "--warmup=1"])
    rows = _rows(capsys.readouterr().out)
    assert rows["torch.compile, fused AdamW"] > 0 and len(rows) == 3


def test_precision_bench_prints_both_ratios(capsys):
    """bench/bench_precision.py (the bf16 speed-up behind --amp=auto, bench/performance.py
    reads its two ratio lines): both dtypes run, and the ratios are the medians' quotients."""
    load_bench("bench_precision").main(["--steps=1", "--warmup=0", "--threads=1"])
    out = capsys.readouterr().out
    times = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(
        r"^(float32|bf16)\s+training step\s+([\d.]+) s\s+inference of 32 slices\s+([\d.]+) s", out, re.M)}
    assert set(times) == {"float32", "bf16"}, out
    train = float(re.search(r"ratio float32/bf16 training step: ([\d.]+)x", out)[1])
    infer = float(re.search(r"ratio float32/bf16 inference: ([\d.]+)x", out)[1])
    assert train == pytest.approx(times["float32"][0] / times["bf16"][0], abs=0.02)
    assert infer == pytest.approx(times["float32"][1] / times["bf16"][1], abs=0.02)


def test_aux_loss_bench_compares_the_same_loss(capsys):
    """bench/bench_aux_loss.py: the one-hot reference it times against AuxSegLoss is the same
    loss (value and gradient), and the printed ratio is the medians' quotient."""
    bench = load_bench("bench_aux_loss")
    torch = pytest.importorskip("torch")
    logits = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 6, 7))
    from loss import AuxSegLoss
    torch.testing.assert_close(bench.one_hot_loss(logits, target, 5).double(),
                               AuxSegLoss(5)(logits, target).double())
    bench.main(["--batch=2", "--classes=5", "--size=16", "--repeats=2", "--threads=1"])
    out = capsys.readouterr().out
    ms = {m[1]: float(m[2]) for m in re.finditer(r"^\s+(one-hot|gathered) .*?([\d.]+) ms$", out, re.M)}
    assert set(ms) == {"one-hot", "gathered"}, out
    ratio = float(re.search(r"ratio one-hot / gathered\s+([\d.]+)x", out)[1])
    assert ratio == pytest.approx(ms["one-hot"] / ms["gathered"], rel=0.05, abs=0.02)
    diff = float(re.search(r"\|value difference\| ([\d.e+-]+),", out)[1])
    assert diff < 1e-5


def _frontier_studies():
    """A tumour study (a 64-voxel lesion at p 0.9, SUV 10, and an 8-voxel one at p 0.45, SUV 5)
    and a tumour-free one (a 27-voxel blob at p 0.55, SUV 2), 4 mm voxels (0.064 ml)."""
    import numpy as np
    spacing = (4.0, 4.0, 4.0)
    ref = np.zeros((20, 20, 20), bool)
    ref[2:6, 2:6, 2:6] = ref[12:14, 12:14, 12:14] = True
    prob, suv = np.zeros(ref.shape), np.ones(ref.shape)
    prob[2:6, 2:6, 2:6], suv[2:6, 2:6, 2:6] = 0.9, 10.0
    prob[12:14, 12:14, 12:14], suv[12:14, 12:14, 12:14] = 0.45, 5.0
    prob_free, suv_free = np.zeros(ref.shape), np.ones(ref.shape)
    prob_free[5:8, 5:8, 5:8], suv_free[5:8, 5:8, 5:8] = 0.55, 2.0
    return [(prob, ref, suv, spacing), (prob_free, np.zeros_like(ref), suv_free, spacing)]


def test_pp_frontier_scores_every_setting_by_hand():
    """bench/pp_frontier.py: Dice, FPV and recall of each post-processing setting on hand-made
    studies, the settings that meet the targets, the trade-off, and the validation choice."""
    import numpy as np
    from metrics import case_metrics
    frontier = load_bench("pp_frontier")
    studies = _frontier_studies()
    grid = {"threshold": (0.4, 0.5), "suv_floor": (0.0, 2.5), "min_component_ml": (0.0,),
            "min_component_suvmax": (0.0,)}
    rows = {(r["threshold"], r["suv_floor"]): r for r in frontier.score_grid(studies, grid)}
    blob_ml = 27 * 0.064
    expected = {(0.4, 0.0): (1.0, blob_ml, 1.0), (0.4, 2.5): (1.0, 0.0, 1.0),
                (0.5, 0.0): (2 * 64 / (64 + 72), blob_ml, 0.5), (0.5, 2.5): (2 * 64 / (64 + 72), 0.0, 0.5)}
    for key, (dice, fpv, recall) in expected.items():
        assert (rows[key]["dice"], rows[key]["fpv_ml"], rows[key]["recall"]) == pytest.approx((dice, fpv, recall)), key
    # study_scores agrees with the evaluation's own case_metrics
    for prob, ref, suv, spacing in studies:
        for thr in (0.4, 0.5):
            mine, theirs = frontier.study_scores(prob > thr, ref, spacing), case_metrics(prob > thr, ref, spacing)
            assert mine["fpv_ml"] == pytest.approx(theirs["fpv_ml"])
            assert mine["n_detected"] == theirs["n_lesions_detected"]
            assert np.isnan(mine["dice"]) == np.isnan(theirs["dice"])
            if ref.any():
                assert mine["dice"] == pytest.approx(theirs["dice"])
    result = frontier.summarise(list(rows.values()), {"threshold": 0.5, "suv_floor": 0.0,
                                                     "min_component_ml": 0.0, "min_component_suvmax": 0.0})
    assert result["n_meet_all"] == 1 and result["meet_all"][0]["suv_floor"] == 2.5
    assert [(r["threshold"], r["suv_floor"]) for r in result["trade_off"]] == [(0.4, 2.5)]
    assert result["chosen_on_validation"]["recall"] == 0.5
    assert result["best_recall_within_fpv"]["threshold"] == 0.4
    text = frontier.to_markdown({**result, "run_dir": "runs/x", "git_commit": "abc",
                                 "checkpoint": "best", "tta": True})
    assert "Settings that meet all three targets: 1 of 4." in text
    assert "| chosen on the validation studies (the run's evaluation) | threshold 0.5, suv_floor 0" in text
    none_met = frontier.to_markdown({**frontier.summarise(list(rows.values()), None, {**frontier.TARGETS,
                                     "recall": 1.1}), "run_dir": "r", "git_commit": "c",
                                     "checkpoint": "best", "tta": False})
    assert "Settings that meet all three targets: 0 of 4." in none_met
    table = [line for line in none_met.splitlines() if line.startswith("| lowest FPV")]
    assert table == ["| lowest FPV with recall >= 1.1 | none | | | |"]  # as many cells as the header


def test_pp_frontier_masks_are_postprocess_masks():
    """pp_frontier labels the components once per threshold and SUV floor: every setting's mask
    must still be exactly metrics.postprocess_mask's, component filters included."""
    import numpy as np
    from metrics import postprocess_mask
    frontier = load_bench("pp_frontier")
    rng = np.random.default_rng(0)
    prob = rng.random((24, 24, 16)) ** 3  # scattered components of many sizes
    suv = rng.gamma(2.0, 2.0, prob.shape)
    grid = {"threshold": (0.3, 0.6), "suv_floor": (0.0, 2.5), "min_component_ml": (0.0, 0.1, 0.3),
            "min_component_suvmax": (0.0, 6.0, 9.0)}
    seen = 0
    for setting, mask in frontier._masks(prob, suv, (4.0, 4.0, 4.0), grid):
        expected = postprocess_mask(prob > setting["threshold"], spacing=(4.0, 4.0, 4.0), suv=suv,
                                    **{k: setting[k] for k in frontier.SETTING_KEYS[1:]})
        assert np.array_equal(mask, expected), setting
        seen += 1
    assert seen == 2 * 2 * 3 * 3
    sizes = {int(m.sum()) for _, m in frontier._masks(prob, suv, (4.0, 4.0, 4.0), grid)}
    assert len(sizes) > 10, sizes  # the filters change the masks: the check is not vacuous


def test_pp_frontier_table_scores_equal_mask_scores():
    """The scores pp_frontier reads from one overlap table per threshold and floor are those of
    study_scores on each setting's own mask (lesions, false positives, component filters)."""
    import numpy as np
    frontier = load_bench("pp_frontier")
    rng = np.random.default_rng(1)
    prob = rng.random((24, 24, 16)) ** 3
    suv = rng.gamma(2.0, 2.0, prob.shape)
    ref = np.zeros(prob.shape, bool)
    ref[2:7, 2:7, 2:6] = ref[15:17, 15:17, 9:11] = ref[10:12, 18:20, 2:3] = True
    prob[ref] = np.clip(prob[ref] + 0.5, 0, 1)  # lesions mostly found at the low thresholds
    grid = {"threshold": (0.3, 0.6, 0.9), "suv_floor": (0.0, 2.5), "min_component_ml": (0.0, 0.1, 0.3),
            "min_component_suvmax": (0.0, 6.0)}
    spacing = (4.0, 4.0, 4.0)
    masks = {tuple(s.values()): m for s, m in frontier._masks(prob, suv, spacing, grid)}
    detected = set()
    for setting, fast in frontier._study_grid_scores(prob, ref, suv, spacing, grid):
        slow = frontier.study_scores(masks[tuple(setting.values())], ref, spacing)
        assert fast == pytest.approx(slow), setting
        detected.add(fast["n_detected"])
    assert len(detected) > 1  # settings differ in what they detect: the check is not vacuous
    free = list(frontier._study_grid_scores(prob, np.zeros_like(ref), suv, spacing, grid))
    for setting, fast in free:
        assert fast == pytest.approx(frontier.study_scores(masks[tuple(setting.values())],
                                                           np.zeros_like(ref), spacing), nan_ok=True)
