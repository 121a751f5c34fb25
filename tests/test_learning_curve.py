"""bench/learning_curve.py on a tiny run that kept its epoch checkpoints (seconds on a CPU)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import load_bench, train_tiny_run


@pytest.fixture(scope="module")
def curve_module():
    return load_bench("learning_curve")


def test_learning_curve_of_a_tiny_run(tmp_path, curve_module):
    run_dir = train_tiny_run(tmp_path, "lc")
    curve_module.main([f"--run_dir={run_dir}", f"--out={tmp_path / 'curve'}"])
    with open(tmp_path / "curve" / "learning_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(curve_module.COLUMNS)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == \
        [(e["epoch"], e["step"]) for e in logged]
    assert [float(r["val_pseudo_dice"]) for r in rows] == pytest.approx(
        [e["val_pseudo_dice"] for e in logged])
    assert (tmp_path / "curve" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    # best.pt holds the weights of the best epoch: that epoch's test Dice is main.py's eval/
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert float(rows[best - 1]["test_dice"]) == pytest.approx(summary["metrics"]["dice"]["mean"])
    # each epoch has its own evaluation folder; a second curve reads them, computes nothing new
    folders = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("eval-"))
    assert folders == [f"eval-epoch_{e['epoch']}" for e in logged]
    as_read = [{k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in r.items()}
               for r in rows]
    assert curve_module.learning_curve(run_dir) == as_read
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("eval-")) == folders
    # every=2 of 2 epochs: epoch 2 (and the last, the same) keeps its test figures, epoch 1 not
    sparse = curve_module.learning_curve(run_dir, every=2)
    assert [r["test_dice"] == as_read[i]["test_dice"] for i, r in enumerate(sparse)] == [False, True]
    assert sparse[0]["val_pseudo_dice"] == as_read[0]["val_pseudo_dice"]
    with pytest.raises(curve_module.CurveError, match="--every=0"):
        curve_module.learning_curve(run_dir, every=0)


def test_a_run_without_epoch_checkpoints_is_a_clear_error(tmp_path, curve_module):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(curve_module.CurveError, match="keep_epoch_checkpoints=True"):
        curve_module.learning_curve(tmp_path)


def test_a_run_whose_cache_is_gone_is_curved_from_the_cache_dir_given(tmp_path, curve_module):
    """bench/main_run.py --keep keeps a run whose temporary cache it removes: --cache_dir
    prepares its test studies in the folder given, not again at the removed path."""
    import shutil

    run_dir = train_tiny_run(tmp_path, "kept")
    shutil.rmtree(tmp_path / "cache")
    curve_module.main([f"--run_dir={run_dir}", f"--out={tmp_path / 'curve'}",
                       f"--cache_dir={tmp_path / 'other'}"])
    assert not (tmp_path / "cache").exists()
    assert list((tmp_path / "other").rglob("image.npy"))
    with open(tmp_path / "curve" / "learning_curve.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"]
    assert float(rows[best - 1]["test_dice"]) == pytest.approx(summary["metrics"]["dice"]["mean"])
