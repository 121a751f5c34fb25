"""bench/fpv_sampling.py: how far a validation set of n tumour-free studies can land from a
population's mean false-positive volume, on hand-made per_case.csv files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def fs():
    return load_bench("fpv_sampling")


def write_per_case(path, rows, pp=True):
    path.mkdir(parents=True, exist_ok=True)
    fields = ["case_id", "has_tumor", "fpv_ml"] + (["pp_fpv_ml"] if pp else [])
    with open(path / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for i, (tumour, raw, post) in enumerate(rows):
            w.writerow(dict(case_id=f"c{i}", has_tumor=str(tumour), fpv_ml=raw,
                            **({"pp_fpv_ml": post} if pp else {})))


def test_reads_the_post_processed_volume_of_tumour_free_studies_only(fs, tmp_path):
    write_per_case(tmp_path / "a", [(False, 9.0, 0.0), (False, 9.0, 0.0), (False, 9.0, 0.0),
                                    (False, 9.0, 10.0), (True, 50.0, 50.0)])
    values, column = fs.tumour_free_fpv(tmp_path / "a" / "per_case.csv")
    assert column == "pp_fpv_ml" and sorted(values) == [0.0, 0.0, 0.0, 10.0]
    write_per_case(tmp_path / "b", [(False, 2.0, None), (True, 5.0, None)], pp=False)
    values, column = fs.tumour_free_fpv(tmp_path / "b" / "per_case.csv")
    assert column == "fpv_ml" and list(values) == [2.0]


def test_sampled_means_against_hand_computed_probabilities(fs):
    """Population 0, 0, 0, 10 ml: one study drawn is 0 with probability 3/4; the mean of two is
    0 with probability 9/16 and 10 (both the 10 ml study) with 1/16."""
    values = np.array([0.0, 0.0, 0.0, 10.0])
    one = fs.sample_means(values, 1, 200_000)
    assert (one == 0).mean() == pytest.approx(0.75, abs=0.005)
    two = fs.sample_means(values, 2, 200_000)
    assert (two == 0).mean() == pytest.approx(9 / 16, abs=0.005)
    assert (two == 10).mean() == pytest.approx(1 / 16, abs=0.003)
    assert two.mean() == pytest.approx(2.5, abs=0.05)
    text = fs.report(values, "pp_fpv_ml", [1, 2], 200_000, observed=0.0, n=2, source="x")
    assert "10.00, 0.00, 0.00, 0.00 ml; the largest 1 carry 100% of the total" in text
    assert "| 1 | 0.000 ml | 0.000 ml | 10.000 ml |" in text
    assert "Draws of 2 studies whose mean is <= 0 ml: 56." in text  # 9/16 = 56.25 %


def test_command_line_refuses_bad_input_and_never_overwrites(fs, tmp_path, capsys):
    write_per_case(tmp_path / "e", [(False, 0, 1.0), (False, 0, 3.0), (True, 1, 1)])
    with pytest.raises(SystemExit, match="no per_case.csv"):
        fs.main([f"--eval={tmp_path}"])
    with pytest.raises(SystemExit, match="go together"):
        fs.main([f"--eval={tmp_path / 'e'}", "--observed=1"])
    with pytest.raises(SystemExit, match="whole numbers"):
        fs.main([f"--eval={tmp_path / 'e'}", "--sizes=a,b"])
    out = tmp_path / "t.md"
    fs.main([f"--eval={tmp_path / 'e'}", "--sizes=1", "--draws=1000", f"--out={out}"])
    assert "mean 2.000 ml" in out.read_text() and "mean 2.000 ml" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        fs.main([f"--eval={tmp_path / 'e'}", f"--out={out}"])
    write_per_case(tmp_path / "t", [(True, 1, 1)])
    with pytest.raises(SystemExit, match="no tumour-free studies"):
        fs.main([f"--eval={tmp_path / 't'}"])
