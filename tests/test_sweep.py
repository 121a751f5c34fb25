"""The study machinery: grid size, paired differences, leaderboard files (and a real smoke sweep)."""

import csv
import json
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
    assert set(sweep.GRID_BUDGETS) == set(sweep.GRIDS)
    for grid_name, budgets in sweep.GRID_BUDGETS.items():
        for budget_name in budgets:
            budget, grid = sweep.BUDGETS[budget_name], sweep.GRIDS[grid_name]
            cfgs = [config.make_config({**budget, **o}) for o in grid.values()]
            assert len({(c.epochs, c.steps_per_epoch, c.batch_size) for c in cfgs}) == 1


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
    # the H200 runs predate the recorded commit; every CPU run has one
    on_h200 = [r["machine"].startswith("NVIDIA H200") for r in rows]
    assert {r["commit"] for r, h in zip(rows, on_h200) if h} == {"unknown"}
    assert all(r["commit"] != "unknown" for r, h in zip(rows, on_h200) if not h)
    # the H200 bce_posweight ran before threshold tuning: a name of its own
    assert {(r["config"], r["machine"].split(",")[0]) for r in rows
            if r["grid_name"] == "bce_posweight"} == {
        ("bce_posweight", "CPU (2 cores)"), ("bce_posweight [tune_threshold=False]", "NVIDIA H200")}
    with open(tmp_path / "lb" / "paired_tests.csv") as f:
        tests = list(csv.DictReader(f))
    assert {(t["config"], t["reference"]) for t in tests} >= {
        ("corrected_combined", "published_combined"), ("bce_posweight", "published_combined")}
    assert all(t["n"] == "25" and not t["refused"] for t in tests)  # 25 tumour, 25 tumour-free

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


# ---- fake evaluated runs: the collection without training ---------------------------------
TUMOUR, FREE = ["t1", "t2", "t3", "t4"], ["f1", "f2", "f3"]


def fake_run(root, name, seed, overrides, *, dice, fpv, commit="0123456789abcdef+dirty",
             test=TUMOUR + FREE, budget="smoke", post=None, **extra):
    """A run directory as main.py leaves it (the files collection reads), with the given
    per-study Dice (tumour studies) and FPV (tumour-free studies); `post`: (Dice, FPV) of the
    post-processed masks, as test.py writes them for a config that post-processes."""
    run_dir = root / f"{name}-s{seed}"
    (run_dir / "eval").mkdir(parents=True)
    settings = {**sweep.BUDGETS[budget], **overrides, "seed": seed, **extra}
    env = {"gpus": [], "cpu_count": 2, "torch": "2.x"}
    if commit is not None:
        env["git_commit"] = commit
    (run_dir / "config.json").write_text(json.dumps(
        {"config": config.make_config(settings).to_dict(), "environment": env}, default=str))
    (run_dir / "split.json").write_text(json.dumps({"train": ["a", "b"], "val": ["v"],
                                                    "test": test}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 2, "seconds": 1.0,
                                                       "val_pseudo_dice": 0.1}) + "\n")
    rows = [{"case_id": c, "has_tumor": True, "dice": d, "fpv_ml": 0.0}
            for c, d in zip(TUMOUR, dice)]
    rows += [{"case_id": c, "has_tumor": False, "dice": math.nan, "fpv_ml": v}
             for c, v in zip(FREE, fpv)]
    if post:
        for row, d, v in zip(rows, [*post[0], *[math.nan] * len(FREE)], [0.0] * 4 + post[1]):
            row.update(pp_dice=d, pp_fpv_ml=v)
    with open(run_dir / "eval" / "per_case.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    summary = {"n_studies": len(rows), "n_tumor": len(dice),
               "metrics": {"dice": {"mean": mean(dice), "ci95": [0.0, 1.0]},
                           "fpv_ml_tumor_free": {"mean": mean(fpv)}, "fnv_ml": {"mean": 1.0},
                           "hd95_mm": {"mean": 5.0}},
               "lesions": {"recall": 0.5, "precision": 0.5, "f1": 0.5},
               "environment": {"git_commit": "fedcba9876543210"}}
    if post:
        summary["postprocessed"] = {**summary, "metrics": {
            **summary["metrics"], "dice": {"mean": mean(post[0])},
            "fpv_ml_tumor_free": {"mean": mean(post[1])}}}
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_runs_of_one_name_with_other_settings_get_their_own_name(tmp_path):
    """Two runs called bce_posweight, one as sweep.py defines it today, one without threshold
    tuning: two names, two rows, never one mean; neutral settings (workers, cache, bootstrap,
    seed) change nothing; the commit of each run is its row's."""
    overrides = sweep.HEADLINE["bce_posweight"]
    fake_run(tmp_path, "bce_posweight", 0, overrides, dice=[0.1] * 4, fpv=[1.0] * 3,
             num_workers=3, cache_dir="/elsewhere", n_bootstrap=7)
    fake_run(tmp_path, "bce_posweight", 1, {**overrides, "tune_threshold": False},
             dice=[0.0] * 4, fpv=[0.0] * 3, commit=None)
    plan = [("bce_posweight", s, overrides) for s in (0, 1)]
    rows = {r["seed"]: r for r, _ in sweep.collect(plan, [tmp_path], budget="smoke")}
    assert rows[0]["config"] == "bce_posweight"
    assert rows[1]["config"] == "bce_posweight [tune_threshold=False]"
    assert rows[0]["settings_id"] != rows[1]["settings_id"]
    assert (rows[0]["commit"], rows[1]["commit"]) == ("0123456789abcdef+dirty", "unknown")
    assert rows[0]["eval_commit"] == "fedcba9876543210" and rows[0]["n_train"] == 2
    table = sweep.aggregate(list(rows.values()))
    assert sorted((e["config"], e["seeds"]) for e in table) == [
        ("bce_posweight", 1), ("bce_posweight [tune_threshold=False]", 1)]
    sweep.write_results(list(rows.values()), tmp_path / "lb", "t")
    text = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "| 0123456* |" in text and "| unknown |" in text
    with open(tmp_path / "lb" / "leaderboard.csv") as f:
        assert {r["commit"] for r in csv.DictReader(f)} == {"0123456789abcdef+dirty", "unknown"}
    # without a definition to compare with: the keys in which the runs differ, on both
    unnamed = [r for r, _ in sweep.collect(plan, [tmp_path])]
    assert sorted(r["config"] for r in unnamed) == [
        "bce_posweight [tune_threshold=False]", "bce_posweight [tune_threshold=True]"]
    # seed, output folders and the rest of NEUTRAL_SETTINGS are not settings
    base = config.make_config(sweep.BUDGETS["smoke"]).to_dict()
    moved = {**base, **{k: v for k, v in {"seed": 5, "out_dir": "x", "run_name": "y",
                                          "device": "cpu", "save_overlays": True}.items()}}
    assert sweep.settings_fingerprint(moved) == sweep.settings_fingerprint(base)
    assert set(sweep.NEUTRAL_SETTINGS) <= set(base)


def test_paired_tests_average_seeds_per_study_then_compare_studies(tmp_path):
    ref_dice = [[0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9]]  # seeds 0 and 1
    gain = [[0.1, 0.0, 0.2, 0.1], [0.1, 0.2, 0.0, 0.1]]
    for seed in (0, 1):
        fake_run(tmp_path, "published_combined", seed, sweep.PUBLISHED, dice=ref_dice[seed],
                 fpv=[1.0, 2.0, 0.0])
        fake_run(tmp_path, "corrected_combined", seed, sweep.CORRECTED,
                 dice=[d + g for d, g in zip(ref_dice[seed], gain[seed])], fpv=[1.0, 1.0, 0.0])
    fake_run(tmp_path, "corrected_combined", 2, sweep.CORRECTED, dice=[0.0] * 4, fpv=[9.0] * 3)
    plan = [(n, s, o) for n, o in (("published_combined", sweep.PUBLISHED),
                                   ("corrected_combined", sweep.CORRECTED)) for s in (0, 1, 2)]
    found = sweep.collect(plan, [tmp_path], budget="smoke")
    tests = {t["metric"]: t for t in sweep.paired_tests(found, [("corrected_combined",
                                                                 "published_combined")])}
    dice, fpv = tests["dice"], tests["fpv_ml_tumor_free"]
    assert dice["seeds"] == "0,1" and dice["n"] == 4  # seed 2 has no reference run: not used
    # per study, the gain averaged over seeds 0 and 1: 0.1, 0.1, 0.1, 0.1
    assert math.isclose(dice["mean_diff"], 0.1) and dice["ci95_low"] == pytest.approx(0.1)
    assert math.isclose(fpv["mean_diff"], -1 / 3) and fpv["n"] == 3
    assert dice["seeds_same_sign"] == "2/2" and dice["refused"] == ""
    sweep.write_paired_tests(list(tests.values()), tmp_path / "out", "t")
    md = (tmp_path / "out" / "paired_tests.md").read_text()
    assert "| corrected_combined | published_combined | 0,1 |" in md
    with open(tmp_path / "out" / "paired_tests.csv") as f:
        assert [r["metric"] for r in csv.DictReader(f)] == ["dice", "fpv_ml_tumor_free"]
    # other test studies in one of the runs: refused, not paired
    split = tmp_path / "published_combined-s1" / "split.json"
    split.write_text(split.read_text().replace('"t1"', '"t9"'))
    refused = sweep.paired_tests(found, [("corrected_combined", "published_combined")])
    assert {t["refused"] for t in refused} == {"the runs' split.json test sets differ"}
    sweep.write_paired_tests(refused, tmp_path / "out2", "t")
    assert "refused: the runs' split.json" in (tmp_path / "out2" / "paired_tests.md").read_text()


def test_versus_plot_of_training_studies(tmp_path):
    for name, n in (("phantom_50", 40), ("phantom_70", 60)):
        run_dir = fake_run(tmp_path, name, 0, sweep.DATA_SIZE[name], dice=[0.1] * 4, fpv=[0.0] * 3,
                           budget="quick")
        split = json.loads((run_dir / "split.json").read_text())
        split["train"] = [f"c{i}" for i in range(n)]
        (run_dir / "split.json").write_text(json.dumps(split))
    plan = sweep.run_plan("data_size", None, ("phantom_50", "phantom_70"))
    rows = [r for r, _ in sweep.collect(plan, [tmp_path], budget="quick")]
    assert sorted((r["config"], r["n_train"], r["phantom_cases"]) for r in rows) == [
        ("phantom_50", 40, 50), ("phantom_70", 60, 70)]
    sweep.plot_versus(rows, "n_train", tmp_path / "v.png", "t")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_issue_13_grids_and_budgets():
    for grid, budgets in sweep.GRID_BUDGETS.items():
        for overrides in sweep.GRIDS[grid].values():
            config.make_config({**sweep.BUDGETS[budgets[0]], **overrides})
    levers = sweep.LEVERS
    assert levers["aux_organs"]["aux_target"] == "organs"
    uptake = levers["aux_uptake"]
    assert (uptake["aux_target"], uptake["uptake_suv"]) == ("uptake", 2.5)
    assert levers["more_studies_150"]["phantom_cases"] == 160  # 150 training + 10 validation
    assert levers["misalign"]["p_misalign"] == 0.1 and levers["context_2.5d"]["context_slices"] == 1
    assert levers["tune_threshold"]["tune_threshold"] is True
    assert levers["postprocess"]["suv_floor"] == sweep.LEVER_SUV_FLOOR > 0
    for name, overrides in levers.items():  # one lever each on top of the reference
        if name != "corrected_combined":
            assert {k: v for k, v in overrides.items() if sweep.CORRECTED.get(k) != v}, name
    plan = sweep.run_plan("headline_long", None)
    assert sorted({n for n, _, _ in plan}) == ["aux_organs", "corrected_combined",
                                                "published_combined"]
    assert all(sorted(s for n2, s, _ in plan if n2 == n) == [0, 1, 2] for n, _, _ in plan)
    assert {s for _, s, _ in sweep.run_plan("levers", None)} == {0}
    steps = lambda b: b["epochs"] * b["steps_per_epoch"]  # noqa: E731
    assert 3 <= steps(sweep.BUDGETS["long"]) / steps(sweep.BUDGETS["cpu"]) <= 4
    assert sweep.BUDGETS["long"]["keep_epoch_checkpoints"] is True
    cases = [config.make_config({**sweep.BUDGETS["quick"], **o}) for o in sweep.DATA_SIZE.values()]
    assert len({(c.n_val, c.n_test, c.phantom_test_seed) for c in cases}) == 1 and \
        sorted(c.phantom_cases for c in cases) == [50, 70, 110, 210]
    grids = {n for pair in sweep.COMPARISONS for n in pair}
    assert grids <= {n for g in sweep.GRIDS.values() for n in g}


def test_a_post_processing_configuration_is_judged_on_its_post_processed_masks(tmp_path):
    fake_run(tmp_path, "corrected_combined", 0, sweep.CORRECTED, dice=[0.5] * 4, fpv=[2.0] * 3,
             budget="cpu")
    fake_run(tmp_path, "postprocess", 0, sweep.LEVERS["postprocess"], dice=[0.5] * 4,
             fpv=[2.0] * 3, post=([0.4] * 4, [0.5] * 3), budget="cpu")
    plan = sweep.run_plan("levers", None, ("corrected_combined", "postprocess"))
    found = sweep.collect(plan, [tmp_path], budget="cpu")
    row = next(r for r, _ in found if r["config"] == "postprocess")
    assert row["postprocessed"] is True and math.isclose(row["test_dice"], 0.4)
    assert math.isclose(row["fpv_ml_tumor_free"], 0.5)
    tests = {t["metric"]: t for t in sweep.paired_tests(found)}  # postprocess vs corrected
    assert math.isclose(tests["dice"]["mean_diff"], -0.1)
    assert math.isclose(tests["fpv_ml_tumor_free"]["mean_diff"], -1.5)


def test_a_grid_with_a_budget_it_cannot_use_is_refused_before_any_run(tmp_path):
    # data_size's phantom_50 cannot also split off the cpu budget's 50 test studies: the whole
    # plan is checked first, the error names the run and the budgets meant for the grid
    with pytest.raises(config.ConfigError, match=r"(?s)phantom_50 \(seed 0\).*quick, long, smoke"):
        sweep.main(["--grid=data_size", "--budget=cpu", f"--runs_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_a_bf16_cpu_run_never_shares_a_row_with_float32_runs(tmp_path):
    """amp="auto" is float32 on a CPU without bf16 in hardware (and was on every CPU before the
    record existed) but bf16 where config.json records cpu_native_bf16: the fingerprint says
    so, and GPU runs stay as recorded (their machine column separates them)."""
    cfg = config.make_config({"preset": "tiny"})
    environments = {"fp32": {"gpus": [], "cpu_native_bf16": False}, "old": {"gpus": []},
                    "bf16": {"gpus": [], "cpu_native_bf16": True},
                    "gpu": {"gpus": ["NVIDIA H200"], "cpu_native_bf16": True}}
    facts = {}
    for name, environment in environments.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps({"config": cfg.to_dict(), "environment": environment}))
        facts[name] = sweep.run_facts(tmp_path / name, cfg)
    ids = {name: f["settings_id"] for name, f in facts.items()}
    assert ids["fp32"] == ids["old"] == ids["gpu"] != ids["bf16"]
    assert facts["bf16"]["_fingerprint"]["amp"] == "bf16" and facts["fp32"]["_fingerprint"]["amp"] == "auto"
    explicit = config.make_config({"preset": "tiny", "amp": "False"})
    assert sweep.computed_amp(explicit.amp, environments["bf16"]) == "False"
