"""bench/runs_table.py: evidence collected without overwriting, a table paired with a reference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def rt():
    return load_bench("runs_table")


def fake_run(folder: Path, *, epochs: int, dice: list[float], fpv: list[float], cases=None,
             seed: int = 0) -> None:
    """A finished run's small files: 3 tumour studies (dice) and 3 tumour-free ones (fpv)."""
    cases = cases or [f"c{i}" for i in range(6)]
    (folder / "eval").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "config": {"epochs": epochs, "lr": 0.003, "run_name": folder.name, "seed": seed},
        "environment": {"git_commit": "abcdef0123456789"}}))
    (folder / "split.json").write_text(json.dumps({"train": [], "val": [], "test": cases}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "step": 10 * e, "val_pseudo_dice": [0.1, 0.5, 0.3][e - 1],
                    "val_fpv_ml": 1.0}) + "\n"
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
    assert "| 0 | 2 / 30 |" in row and "0.500 / 0.500" in row and "`abcdef0`" in row and "| 0.50 / 1.00 |" in row
    # an evidence folder is never overwritten; other test studies are refused
    with pytest.raises(rt.TableError, match="exists already"):
        rt.collect([runs / "ref"], evidence)
    fake_run(runs / "other", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0],
             cases=[f"x{i}" for i in range(6)])
    rt.collect([runs / "other"], evidence)
    with pytest.raises(rt.TableError, match="other studies"):
        rt.table(evidence, "ref")


def test_seeds_of_one_configuration_are_one_row(tmp_path, rt):
    """Runs that differ only in the seed: mean ± SD per row, the paired difference averaged per
    study over the seeds both rows have, and how many seeds share its sign."""
    ev = tmp_path / "evidence"
    fake_run(ev / "ref", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0], seed=0)
    fake_run(ev / "ref_s1", epochs=3, dice=[0.4, 0.4, 0.4], fpv=[1.0, 1.0, 1.0], seed=1)
    fake_run(ev / "long", epochs=5, dice=[0.5, 0.5, 0.5], fpv=[0.0, 1.0, 2.0], seed=0)
    fake_run(ev / "long_s1", epochs=5, dice=[0.3, 0.3, 0.3], fpv=[2.0, 2.0, 2.0], seed=1)
    text = rt.table(ev, "ref")
    rows = [line for line in text.splitlines() if line.startswith("| ref") or line.startswith("| long")]
    assert len(rows) == 2
    ref_row = next(r for r in rows if r.startswith("| ref, ref_s1 |"))
    long_row = next(r for r in rows if r.startswith("| long, long_s1 |"))
    assert "| reference | 0, 1 |" in ref_row
    # Dice means 0.4 and 0.4 (SD 0), long 0.5 and 0.3: mean 0.400 ± 0.141
    assert "0.400 ± 0.141 / 0.400 ± 0.141" in long_row and "0.400 ± 0.000" in ref_row
    # per study a = (0.5+0.3)/2 = 0.4 against b = (0.2+0.4)/2, 0.4, (0.6+0.4)/2: d = +0.1, 0, -0.1
    assert "| +0.000 [" in long_row
    # FPV: a = 1.0, 1.5, 2.0 against b = 1.0, 1.5, 2.0 -> 0; seed 0 -1.0 per study, seed 1 +1.0
    fpv_cell = long_row.split(" | ")[9]
    assert fpv_cell.startswith("+0.000") or fpv_cell.startswith("-0.000")
    # a seed the reference lacks pairs with nothing
    fake_run(ev / "only_s5", epochs=7, dice=[0.5, 0.5, 0.5], fpv=[0.0, 0.0, 0.0], seed=5)
    row = next(r for r in rt.table(ev, "ref").splitlines() if r.startswith("| only_s5 |"))
    assert "no common seed" in row


def test_seed_sign_counts(tmp_path, rt):
    ev = tmp_path / "evidence"
    for seed, (rd, ld) in enumerate([(0.2, 0.5), (0.3, 0.4), (0.4, 0.3)]):
        fake_run(ev / f"ref_s{seed}", epochs=3, dice=[rd] * 3, fpv=[1.0] * 3, seed=seed)
        fake_run(ev / f"long_s{seed}", epochs=5, dice=[ld] * 3, fpv=[1.0] * 3, seed=seed)
    row = next(r for r in rt.table(ev, "ref_s0").splitlines() if r.startswith("| long_s0"))
    # per-seed differences +0.3, +0.1, -0.1: the mean +0.1 is shared by 2 of 3 seeds
    assert "+0.100 [+0.100, +0.100], " in row and "(2/3 seeds)" in row


def test_a_setting_newer_than_a_run_takes_its_default(tmp_path, rt):
    """An earlier run's config lacks settings added since; they count as today's defaults, so
    the same recipe with a newer commit is the same row and only real changes are listed."""
    ev = tmp_path / "evidence"
    fake_run(ev / "old", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0], seed=0)
    fake_run(ev / "new_s1", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0], seed=1)
    fake_run(ev / "lesion", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0], seed=0)
    for name, extra in (("new_s1", {"select_by": "pseudo_dice", "fg_sampling": "slice"}),
                        ("lesion", {"select_by": "pseudo_dice", "fg_sampling": "lesion"})):
        path = ev / name / "config.json"
        data = json.loads(path.read_text())
        data["config"].update(extra)
        path.write_text(json.dumps(data))
    lines = rt.table(ev, "old").splitlines()
    assert any(line.startswith("| old, new_s1 | reference | 0, 1 |") for line in lines)
    row = next(line for line in lines if line.startswith("| lesion |"))
    assert "| fg_sampling=lesion |" in row


def test_the_last_weights_evaluation_is_its_own_row(tmp_path, rt):
    """--eval=eval-last collects test.py --checkpoint=last's evaluation as <run>.eval-last: a row
    of its own (checkpoint=last), at the last epoch, paired with the reference."""
    runs, ev = tmp_path / "runs", tmp_path / "evidence"
    fake_run(runs / "ref", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0])
    last = tmp_path / "last"
    fake_run(last, epochs=3, dice=[0.4, 0.6, 0.8], fpv=[4.0, 5.0, 6.0])
    summary = json.loads((last / "eval" / "summary.json").read_text())
    summary["settings"] = {"checkpoint": "last"}
    (runs / "ref" / "eval-last").mkdir()
    (runs / "ref" / "eval-last" / "summary.json").write_text(json.dumps(summary))
    for name in ("per_case.csv", "lesions.csv"):
        (runs / "ref" / "eval-last" / name).write_text((last / "eval" / name).read_text())
    rt.main(["--evidence", str(ev), "--collect", str(runs / "ref")])
    rt.main(["--evidence", str(ev), "--collect", str(runs / "ref"), "--eval", "eval-last"])
    assert sorted(p.name for p in ev.iterdir()) == ["ref", "ref.eval-last"]
    row = next(r for r in rt.table(ev, "ref").splitlines() if r.startswith("| ref.eval-last |"))
    assert "| checkpoint=last | 0 | 3 (last) / 30 |" in row
    assert "| +0.200 [+0.200, +0.200]" in row and "| +3.000 [+3.000, +3.000]" in row
    with pytest.raises(rt.TableError, match="lacks eval-tta/summary.json"):
        rt.collect([runs / "ref"], tmp_path / "other", "eval-tta")


def test_weights_with_reestimated_batchnorm_are_their_source_plus_bn_reestimate(tmp_path, rt):
    """bench/precise_bn.py's evaluations (checkpoint "bn<N>-<source>") are a row of their own:
    the source's checkpoint settings plus bn_reestimate=N, at the source's epoch."""
    runs, ev = tmp_path / "runs", tmp_path / "evidence"
    fake_run(runs / "ref", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0])
    other = tmp_path / "other"
    fake_run(other, epochs=3, dice=[0.3, 0.5, 0.7], fpv=[1.0, 2.0, 3.0])
    for checkpoint in ("bn100-best", "bn250-average0.75"):
        folder = runs / "ref" / f"eval-{checkpoint}"
        folder.mkdir()
        summary = json.loads((other / "eval" / "summary.json").read_text())
        summary["settings"] = {"checkpoint": checkpoint}
        (folder / "summary.json").write_text(json.dumps(summary))
        for name in ("per_case.csv", "lesions.csv"):
            (folder / name).write_text((other / "eval" / name).read_text())
    rt.main(["--evidence", str(ev), "--collect", str(runs / "ref")])
    for checkpoint in ("bn100-best", "bn250-average0.75"):
        rt.main(["--evidence", str(ev), "--collect", str(runs / "ref"), "--eval", f"eval-{checkpoint}"])
    lines = rt.table(ev, "ref").splitlines()
    best = next(r for r in lines if r.startswith("| ref.eval-bn100-best |"))
    assert "| bn_reestimate=100 | 0 |" in best and "| +0.100 [+0.100, +0.100]" in best
    averaged = next(r for r in lines if r.startswith("| ref.eval-bn250-average0.75 |"))
    assert "average_from=0.75, bn_reestimate=250, checkpoint=average |" in averaged
    assert "| mean after 0.75 of the steps / 30 |" in averaged


def test_an_evaluation_over_other_pp_thresholds_is_its_own_row(tmp_path, rt):
    """test.py --pp_thresholds tunes post-processing over other thresholds: the summary's
    settings say so, and that evaluation is a row of its own beside the run's own one."""
    ev = tmp_path / "evidence"
    for name, thresholds, dice in (("ref", None, [0.2, 0.4, 0.6]),
                                   ("ref.eval-ppthr", [0.3, 0.9], [0.3, 0.5, 0.7])):
        fake_run(ev / name, epochs=3, dice=dice, fpv=[1.0, 2.0, 3.0])
        path = ev / name / "config.json"
        doc = json.loads(path.read_text())
        doc["config"]["tune_postprocess"] = True
        path.write_text(json.dumps(doc))
        if thresholds:
            summary = json.loads((ev / name / "eval" / "summary.json").read_text())
            summary["settings"] = {"checkpoint": "best", "pp_thresholds": thresholds}
            (ev / name / "eval" / "summary.json").write_text(json.dumps(summary))
    lines = rt.table(ev, "ref").splitlines()
    row = next(r for r in lines if r.startswith("| ref.eval-ppthr |"))
    assert "| pp_thresholds=[0.3, 0.9] |" in row and "| +0.100 [+0.100, +0.100]" in row


def test_an_evaluation_within_a_false_positive_limit_names_its_objective_and_limit(tmp_path, rt):
    """test.py --pp_objective=mean_dice_fpv --pp_max_fpv_ml=0.5: the row names both; a summary
    that records the default limit beside another objective changes nothing."""
    ev = tmp_path / "evidence"
    for name, settings in (("ref", {"checkpoint": "best", "pp_objective": "pooled_dice",
                                    "pp_max_fpv_ml": 1.0}),
                           ("ref.eval-ppmeandicefpv0.5", {"checkpoint": "best",
                                                          "pp_objective": "mean_dice_fpv",
                                                          "pp_max_fpv_ml": 0.5})):
        fake_run(ev / name, epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0])
        doc = json.loads((ev / name / "config.json").read_text())
        doc["config"]["tune_postprocess"] = True
        (ev / name / "config.json").write_text(json.dumps(doc))
        summary = json.loads((ev / name / "eval" / "summary.json").read_text())
        summary["settings"] = settings
        (ev / name / "eval" / "summary.json").write_text(json.dumps(summary))
    lines = rt.table(ev, "ref").splitlines()
    row = next(r for r in lines if r.startswith("| ref.eval-ppmeandicefpv0.5 |"))
    assert "| pp_max_fpv_ml=0.5, pp_objective=mean_dice_fpv |" in row


def test_the_default_pp_thresholds_recorded_by_a_summary_are_no_change(tmp_path, rt):
    """A newer evaluation records the default thresholds in summary.json (a JSON list); the
    reference predates that record and takes the default (a tuple): the same setting, so the
    row lists only what really differs."""
    ev = tmp_path / "evidence"
    for name, epochs in (("ref", 3), ("new", 5)):
        fake_run(ev / name, epochs=epochs, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0])
        doc = json.loads((ev / name / "config.json").read_text())
        doc["config"]["tune_postprocess"] = True
        (ev / name / "config.json").write_text(json.dumps(doc))
    summary = json.loads((ev / "new" / "eval" / "summary.json").read_text())
    summary["settings"] = {"checkpoint": "best", "pp_thresholds": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}
    (ev / "new" / "eval" / "summary.json").write_text(json.dumps(summary))
    row = next(r for r in rt.table(ev, "ref").splitlines() if r.startswith("| new |"))
    assert "| epochs=5 |" in row


def test_a_cpu_run_in_bf16_is_not_one_row_with_float32_runs(tmp_path, rt):
    """amp="auto" on a CPU: float32 for runs that predate the record, bf16 where config.json
    says the CPU had bf16 in hardware; the change column names it."""
    ev = tmp_path / "evidence"
    fake_run(ev / "fp32", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0], seed=0)
    fake_run(ev / "fp32_s1", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0], seed=1)
    fake_run(ev / "bf16", epochs=3, dice=[0.2, 0.4, 0.6], fpv=[1.0, 2.0, 3.0], seed=0)
    for name, native in (("fp32_s1", False), ("bf16", True)):
        path = ev / name / "config.json"
        data = json.loads(path.read_text())
        data["config"]["amp"] = "auto"
        data["environment"]["cpu_native_bf16"] = native
        path.write_text(json.dumps(data))
    lines = rt.table(ev, "fp32").splitlines()
    assert any(line.startswith("| fp32, fp32_s1 | reference | 0, 1 |") for line in lines)
    row = next(line for line in lines if line.startswith("| bf16 |"))
    assert "| amp=bf16 |" in row
    assert rt.cpu_precision("auto", {"gpus": ["NVIDIA H200"], "cpu_native_bf16": True}) == "auto"
    assert rt.cpu_precision("False", {"cpu_native_bf16": True}) == "False"


def test_an_averaged_tta_evaluation_is_one_row_with_a_run_trained_so(tmp_path, rt):
    """test.py --checkpoint=average --average_from=0.75 --tta=True on a run trained without them
    (summary: checkpoint average0.75, tta True) and a run trained with --average_from=0.75
    --tta=True are the same configuration: one row, checkpoint=average, tta=True, the averaged
    epochs in the epoch column; the run's own best-epoch evaluation is its own row."""
    ev = tmp_path / "evidence"
    for name, seed, trained, scored in (("ref", 0, {}, None),
                                        ("ref.eval-average0.75-tta", 0, {}, [2, 3]),
                                        ("avg_s1", 1, {"average_from": 0.75, "tta": True,
                                                       "keep_epoch_checkpoints": True}, [2, 3])):
        fake_run(ev / name, epochs=3, dice=[0.2, 0.4, 0.6] if scored is None else [0.4, 0.5, 0.6],
                 fpv=[1.0, 2.0, 3.0], seed=seed)
        path = ev / name / "config.json"
        doc = json.loads(path.read_text())
        doc["config"].update(trained)
        path.write_text(json.dumps(doc))
        if scored:
            summary = json.loads((ev / name / "eval" / "summary.json").read_text())
            summary["settings"] = {"checkpoint": "average0.75", "averaged_epochs": scored,
                                   "tta": True}
            (ev / name / "eval" / "summary.json").write_text(json.dumps(summary))
    lines = rt.table(ev, "ref").splitlines()
    row = next(r for r in lines if r.startswith("| ref.eval-average0.75-tta, avg_s1 |"))
    assert "| average_from=0.75, checkpoint=average, tta=True | 0, 1 |" in row
    assert "| mean of 2-3, mean of 2-3 / 30 |" in row
    # paired on seed 0, the seed both rows have: study differences 0.2, 0.1, 0.0
    assert "| +0.100 [+0.000, +0.200], 0.5 |" in row
    assert any(r.startswith("| ref | reference | 0 | 2 / 30 |") for r in lines)


def _sized_run(ev: Path, name: str, *, seed: int, n_train: int, dice: list[float],
               changes: dict | None = None) -> None:
    """fake_run with `n_train` training studies (split.json) of phantom_cases n_train + 100."""
    fake_run(ev / name, epochs=3, dice=dice, fpv=[1.0, 2.0, 3.0], seed=seed)
    path = ev / name / "config.json"
    doc = json.loads(path.read_text())
    doc["config"].update({"phantom_cases": n_train + 100, **(changes or {})})
    path.write_text(json.dumps(doc))
    split = json.loads((ev / name / "split.json").read_text())
    split["train"] = [f"t{i}" for i in range(n_train)]
    (ev / name / "split.json").write_text(json.dumps(split))


def test_a_curve_against_training_studies(tmp_path, rt):
    ev = tmp_path / "evidence"
    _sized_run(ev, "small", seed=0, n_train=4, dice=[0.1, 0.2, 0.3])
    _sized_run(ev, "big", seed=0, n_train=8, dice=[0.4, 0.5, 0.6])
    _sized_run(ev, "big_s1", seed=1, n_train=8, dice=[0.6, 0.7, 0.8])
    out = tmp_path / "curve" / "vs.md"
    rt.main(["--evidence", str(ev), "--versus_n_train", "big_s1", "small", "big", "--out", str(out)])
    rows = rt.versus_training_studies(ev, ["big_s1", "small", "big"])
    assert [(r["run"], r["n_train"]) for r in rows] == [("small", 4), ("big", 8), ("big_s1", 8)]
    assert [r["dice_raw"] for r in rows] == pytest.approx([0.2, 0.5, 0.7])
    text = out.read_text()
    # 8 studies: Dice 0.5 and 0.7 -> 0.600 ± 0.141 (raw = post-processed: no pp in the summary)
    assert "| 8 | big, big_s1 | 0, 1 | 0.600 ± 0.141 / 0.600 ± 0.141 |" in text
    assert "| 4 | small | 0 | 0.200 / 0.200 | 2.00 / 2.00 |" in text
    with open(out.with_suffix(".csv"), newline="") as f:
        assert [r["n_train"] for r in csv.DictReader(f)] == ["4", "8", "8"]
    assert out.with_suffix(".png").stat().st_size > 0
    # a run of another recipe is refused, naming what differs
    _sized_run(ev, "other", seed=2, n_train=8, dice=[0.4, 0.5, 0.6], changes={"lr": 0.001})
    with pytest.raises(rt.TableError, match="differs from small in lr"):
        rt.versus_training_studies(ev, ["small", "other"])
    with pytest.raises(rt.TableError, match="no evidence folder"):
        rt.versus_training_studies(ev, ["small", "missing"])
