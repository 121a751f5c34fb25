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


def test_paired_differences_never_pair_across_machines():
    rows = [{**_row("published_combined", s, 0.4, 1.0), "machine": "gpu"} for s in range(3)]
    rows += [{**_row("corrected_combined", s, 0.5, 1.0), "machine": "cpu"} for s in range(3)]
    assert sweep.paired_differences(rows) == []  # no published run on the CPU: nothing to pair
    rows += [{**_row("published_combined", s, 0.3 + 0.01 * s, 1.0), "machine": "cpu"} for s in range(3)]
    (diff,) = sweep.paired_differences(rows)
    assert diff["machine"] == "cpu" and math.isclose(diff["test_dice"], 0.19)
    table = sweep.aggregate(rows)  # one row per configuration and machine
    assert sorted((e["config"], e["machine"]) for e in table) == [
        ("corrected_combined", "cpu"), ("published_combined", "cpu"), ("published_combined", "gpu")]


def test_collect_the_committed_evidence_of_two_machines(tmp_path):
    """The README's merged leaderboard is rebuilt from results/*/runs (no training): one row per
    run found, with the machine of each; --export copies one machine's evidence unchanged."""
    roots = [ROOT / "results" / m / "runs" for m in ("h200", "cpu2core")]
    expected = sum(sweep.run_status(d) is not None
                   for r in roots for d in (r / "study-cpu").glob("*-s*"))
    base = [sys.executable, "sweep.py", "--grid=study", "--budget=cpu", "--collect_only",
            "--seeds=0,1,2"]
    proc = subprocess.run([*base, f"--runs_dir={roots[0]},{roots[1]}", f"--out={tmp_path / 'lb'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "lb" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == expected > 23
    assert {r["machine"].split(",")[0] for r in rows} == {"NVIDIA H200", "CPU (2 cores)"}
    assert "| machine |" in (tmp_path / "lb" / "leaderboard.md").read_text()

    proc = subprocess.run([*base, f"--runs_dir={roots[1]}", f"--out={tmp_path / 'cpu'}",
                           f"--export={tmp_path / 'evidence'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [d for d in (roots[1] / "study-cpu").iterdir() if sweep.run_status(d) is not None]
    for source in runs:
        exported = tmp_path / "evidence" / "study-cpu" / source.name
        for name in ("config.json", "metrics.jsonl", "train.log"):
            assert (exported / name).read_bytes() == (source / name).read_bytes()
        assert not list(exported.rglob("*.pt"))
    refused = subprocess.run([*base, f"--runs_dir={roots[0]},{roots[1]}",
                              f"--export={tmp_path / 'both'}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "one --runs_dir" in refused.stderr


def test_sweep_help_and_bad_options():
    help_ = subprocess.run([sys.executable, "sweep.py", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert help_.returncode == 0 and "--export=DIR" in help_.stdout
    bad = subprocess.run([sys.executable, "sweep.py", "--grid=studdy", "--collect_only"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--grid is one of" in bad.stderr and "Traceback" not in bad.stderr
    two = subprocess.run([sys.executable, "sweep.py", "--runs_dir=a,b", "--only=bce"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert two.returncode == 2 and "one --runs_dir" in two.stderr


def test_readme_tables_are_the_committed_results():
    """Every `<!-- from FILE -->` block of the README holds FILE's current content (run
    `python sweep.py --sync_readme` after collecting); the README shows at least the leaderboard."""
    text = (ROOT / "README.md").read_text()
    assert "<!-- from results/leaderboard.md -->" in text
    assert sweep.sync_readme(ROOT / "README.md", check=True) == []


def test_sync_readme_fills_and_detects_drift(tmp_path):
    (tmp_path / "r.md").write_text("# title\n\n| a |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- from r.md -->\nold numbers\n<!-- end -->\noutro\n")
    assert sweep.sync_readme(readme, check=True) == ["r.md"]
    assert "old numbers" in readme.read_text()  # check mode changes nothing
    assert sweep.sync_readme(readme) == ["r.md"]
    assert readme.read_text() == "intro\n<!-- from r.md -->\n| a |\n|---|\n| 1 |\n<!-- end -->\noutro\n"
    assert sweep.sync_readme(readme, check=True) == []
