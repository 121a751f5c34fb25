"""bench/runs_table.py: evidence collected without overwriting, a table paired with a reference."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("runs_table", ROOT / "bench" / "runs_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, *, epochs: int, dice: list[float], fpv: list[float], cases=None) -> None:
    """A finished run's small files: 3 tumour studies (dice) and 3 tumour-free ones (fpv)."""
    cases = cases or [f"c{i}" for i in range(6)]
    (folder / "eval").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "config": {"epochs": epochs, "lr": 0.003, "run_name": folder.name},
        "environment": {"git_commit": "abcdef0123456789"}}))
    (folder / "split.json").write_text(json.dumps({"train": [], "val": [], "test": cases}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "step": 10 * e, "val_pseudo_dice": [0.1, 0.5, 0.3][e - 1]}) + "\n"
        for e in (1, 2, 3)))
    cohort = {"metrics": {"dice": {"mean": sum(dice) / 3},
                          "fpv_ml_tumor_free": {"mean": sum(fpv) / 3}},
              "lesions": {"recall": 0.5}}
    (folder / "eval" / "summary.json").write_text(json.dumps(cohort))
    (folder / "eval" / "lesions.csv").write_text(
        "case_id,volume_ml,detected\nc0,0.3,False\nc0,0.6,True\nc1,4.0,True\n")
    with open(folder / "eval" / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "has_tumor", "dice", "fpv_ml"])
        w.writeheader()
        for i, case in enumerate(cases):
            tumour = i < 3
            w.writerow({"case_id": case, "has_tumor": str(tumour),
                        "dice": dice[i] if tumour else "nan", "fpv_ml": 0.0 if tumour else fpv[i - 3]})


def test_table_pairs_each_run_with_the_reference(tmp_path, rt):
    runs = tmp_path / "runs"
    fake_run(runs / "ref", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0])
    fake_run(runs / "longer", epochs=5, dice=[0.3, 0.5, 0.7], fpv=[0.5, 1.5, 2.5])
    evidence = tmp_path / "evidence"
    rt.main(["--evidence", str(evidence), "--collect", str(runs / "ref"), str(runs / "longer")])
    assert sorted(p.name for p in evidence.iterdir()) == ["longer", "ref"]
    assert (evidence / "longer" / "eval" / "per_case.csv").read_text() == \
        (runs / "longer" / "eval" / "per_case.csv").read_text()
    text = rt.table(evidence, "ref")
    row = next(line for line in text.splitlines() if line.startswith("| longer |"))
    assert "epochs=5" in row and "lr=" not in row and "run_name" not in row
    assert "| +0.100 [+0.100, +0.100]" in row and "| -0.500 [-0.500, -0.500]" in row
    assert "| 2 / 30 |" in row and "0.500 / 0.500" in row and "`abcdef0`" in row and "| 0.50 / 1.00 |" in row
    # an evidence folder is never overwritten; other test studies are refused
    with pytest.raises(rt.TableError, match="exists already"):
        rt.collect([runs / "ref"], evidence)
    fake_run(runs / "other", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0],
             cases=[f"x{i}" for i in range(6)])
    rt.collect([runs / "other"], evidence)
    with pytest.raises(rt.TableError, match="other studies"):
        rt.table(evidence, "ref")
