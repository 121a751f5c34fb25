"""bench/selection.py: both checkpoint criteria recomputed from a run's epoch checkpoints."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import load_bench, train_tiny_run


@pytest.fixture(scope="module")
def selection():
    return load_bench("selection")


def test_selection_of_a_tiny_run(tmp_path, selection):
    run_dir = train_tiny_run(tmp_path, "sel", "--epochs=3", "--select_by=tuned_pseudo_dice")
    assert selection.main([f"--run_dir={run_dir}", f"--out={tmp_path / 'sel'}"]) == 0
    with open(tmp_path / "sel" / "selection.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["epoch"]) for r in rows] == [e["epoch"] for e in logged] == [1, 2, 3]
    # the validation run again from each epoch's weights gives what the loop logged
    for column in ("val_pseudo_dice", "val_tuned_pseudo_dice", "val_tuned_threshold", "val_fpv_ml"):
        assert [float(r[column]) for r in rows] == pytest.approx(
            [e[column] for e in logged], nan_ok=True), column
    for r in rows:
        tuned, plain = float(r["val_tuned_pseudo_dice"]), float(r["val_pseudo_dice"])
        assert math.isnan(plain) or tuned >= plain - 1e-12  # the best threshold is never worse
    # the run chose by tuned_pseudo_dice: the bench's choice under it is best.pt's epoch
    records = [{k: float(v) for k, v in r.items()} | {"epoch": int(r["epoch"])} for r in rows]
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"]
    assert selection.chosen_epochs(records)["tuned_pseudo_dice"] == best
    text = (tmp_path / "sel" / "selection.md").read_text()
    assert "| tuned_pseudo_dice |" in text and "| pseudo_dice |" in text
    chosen = selection.chosen_epochs(records)
    assert {f"eval-epoch_{e}" for e in chosen.values()} <= {p.name for p in run_dir.iterdir()}
