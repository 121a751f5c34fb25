"""The study machinery: grid size, paired differences, leaderboard files (and a real smoke sweep)."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

import config
import sweep

ROOT = Path(__file__).resolve().parents[1]


def test_study_grid_covers_the_issue():
    assert len(sweep.STUDY) >= 23
    for name, overrides in sweep.STUDY.items():  # every entry is a valid configuration
        config.make_config({**sweep.BUDGETS["cpu"], **overrides})
    models = {o.get("model", "transunet_small") for o in sweep.STUDY.values()}
    assert {"transunet_small", "unet_resnet34", "unetplusplus_resnet34", "fpn_resnet34",
            "deeplabv3plus_resnet34", "segformer_mit_b0"} <= models
    plan = sweep.run_plan("study", None)
    for name in sweep.HEADLINE:  # the headline comparison is repeated over 3 seeds
        assert sorted(seed for n, seed, _ in plan if n == name) == [0, 1, 2]


def test_budgets_give_every_configuration_the_same_work():
    for budget in sweep.BUDGETS.values():
        steps = {(config.make_config({**budget, **o}).epochs,
                  config.make_config({**budget, **o}).steps_per_epoch,
                  config.make_config({**budget, **o}).batch_size) for o in sweep.STUDY.values()}
        assert len(steps) == 1


def _row(name, seed, dice, fpv):
    return {"config": name, "seed": seed, "model": "m", "test_dice": dice, "fpv_ml_tumor_free": fpv,
            "fnv_ml": 1.0, "hd95_mm": 5.0, "lesion_f1": 0.5, "train_seconds": 10.0}


def test_paired_differences_and_verdicts():
    rows = [_row("published_combined", s, d, 1.0) for s, d in enumerate([0.40, 0.50, 0.45])]
    rows += [_row("better", s, d + 0.2, 1.0) for s, d in enumerate([0.40, 0.50, 0.45])]
    rows += [_row("noisy", s, d + x, 1.0) for s, (d, x) in
             enumerate(zip([0.40, 0.50, 0.45], [0.1, -0.1, 0.02]))]
    diffs = {d["config"]: d for d in sweep.paired_differences(rows)}
    assert math.isclose(diffs["better"]["test_dice"], 0.2) and diffs["better"]["test_dice_verdict"] == "higher"
    assert diffs["noisy"]["test_dice_verdict"] == "no difference"
    assert diffs["better"]["fpv_ml_tumor_free_verdict"] == "no difference"  # zero difference
    table = sweep.aggregate(rows)
    assert table[0]["config"] == "better" and math.isclose(table[0]["test_dice"], 0.65)


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    args = [sys.executable, "sweep.py", "--grid=headline", "--budget=smoke", "--seeds=0",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}",
            f"--cache_dir={tmp_path / 'cache'}", "--parallel=2"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "results" / "headline-smoke"
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["config"] for r in rows) == sorted(sweep.HEADLINE)
    assert (out / "leaderboard.md").read_text().count("\n|") >= 3 and (out / "leaderboard.png").exists()
    # rerunning skips finished runs and rebuilds the same leaderboard
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "start" not in again.stdout
