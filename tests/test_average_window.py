"""bench/average_window.py: the averaging window chosen on the validation studies, its rows
equal to test.py's own evaluations, and the errors that stop it before any evaluation."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench, train_tiny_run


@pytest.fixture(scope="module")
def aw():
    return load_bench("average_window")


def _row(fraction, score, dice=0.5):
    figures = {"dice": dice, "fpv_ml_tumor_free": 1.0, "recall": 0.5}
    return {"fraction": fraction, "val_score": score, "raw": figures, "pp": figures}


def test_the_validation_choice_and_its_ties(aw):
    rows = [_row(0.5, 0.70), _row(0.75, 0.72), _row(0.875, 0.71)]
    assert aw.validation_choice(rows, 0.75) == 0.75
    rows = [_row(0.5, 0.73), _row(0.75, 0.72), _row(0.875, 0.73)]
    assert aw.validation_choice(rows, 0.75) == 0.5  # a tie goes to the larger window
    rows = [_row(0.5, 0.72), _row(0.75, 0.72), _row(0.875, 0.70)]
    assert aw.validation_choice(rows, 0.75) == 0.75  # ... unless the run's own fraction is tied


def test_bad_fractions_name_the_setting(aw):
    assert aw.parse_fractions("0.5, 0.75") == [0.5, 0.75]
    for text in ("0.5,1", "0", "0.5,0.5", "half", ""):
        with pytest.raises(aw.WindowError, match="--fractions"):
            aw.parse_fractions(text)


def test_rows_are_the_runs_own_evaluations(tmp_path, aw):
    # tiny: 2 epochs of 3 steps, both validated and kept; average_from=0.5 averages epoch 2
    # (saved after step 6 > 3), 0.25 epochs 1 and 2 (steps 3 and 6 > 1.5)
    run_dir = train_tiny_run(tmp_path, "aw", "--tune_postprocess=True", "--average_from=0.5")
    own = json.loads((run_dir / "eval" / "summary.json").read_text())
    results = aw.compare_runs([run_dir], [0.25], cache_dir=str(tmp_path / "cache"))
    (result,) = results
    assert result["own_fraction"] == 0.5
    assert [r["fraction"] for r in result["rows"]] == [0.25, 0.5]
    assert [r["epochs"] for r in result["rows"]] == [[1, 2], [2]]
    other = json.loads((run_dir / "eval-average0.25" / "summary.json").read_text())
    for row, summary in zip(result["rows"], (other, own)):
        tuning = summary["threshold_tuning"]
        assert row["val_score"] == pytest.approx(tuning["val_pooled_dice"])
        assert row["chosen"] == tuning["chosen"]
        assert row["pp"]["dice"] == pytest.approx(
            summary["postprocessed"]["metrics"]["dice"]["mean"], nan_ok=True)
        assert row["raw"]["fpv_ml_tumor_free"] == pytest.approx(
            summary["metrics"]["fpv_ml_tumor_free"]["mean"], nan_ok=True)
        assert row["pp"]["recall"] == pytest.approx(summary["postprocessed"]["lesions"]["recall"],
                                                    nan_ok=True)
    scores = {r["fraction"]: r["val_score"] for r in result["rows"]}
    best = max(scores.values())
    expected = 0.5 if scores[0.5] == best else 0.25
    assert result["chosen_fraction"] == expected
    # the command line writes the same rows, reading the folders it made instead of evaluating
    stamp = (run_dir / "eval-average0.25" / "summary.json").stat().st_mtime_ns
    out = tmp_path / "aw.md"
    aw.main([f"--run_dir={run_dir}", "--fractions=0.25", f"--out={out}",
             f"--cache_dir={tmp_path / 'cache'}"])
    assert (run_dir / "eval-average0.25" / "summary.json").stat().st_mtime_ns == stamp
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["runs"] == json.loads(json.dumps(results))
    text = out.read_text()
    assert "### aw" in text and "| 0.5 (own)" in text and "←" in text


def test_a_run_without_kept_weights_stops_before_evaluating(tmp_path, aw):
    run_dir = tmp_path / "runs" / "plain"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"keep_epoch_checkpoints": False,
                                                                "tune_postprocess": True}}))
    with pytest.raises(aw.WindowError, match="keep_epoch_checkpoints"):
        aw.compare_runs([run_dir], [0.5])
    (run_dir / "config.json").write_text(json.dumps({"config": {"keep_epoch_checkpoints": True,
                                                                "tune_postprocess": False}}))
    with pytest.raises(aw.WindowError, match="tune_postprocess"):
        aw.compare_runs([run_dir], [0.5])
    with pytest.raises(aw.WindowError, match="config.json not found"):
        aw.compare_runs([tmp_path / "nothing"], [0.5])
