"""End to end, as a user runs it: `python main.py --preset=tiny`, then `python test.py --run_dir`."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PER_CASE_COLUMNS = ["case_id", "has_tumor", "dice", "iou", "hd95_mm", "assd_mm", "sensitivity",
                    "precision", "fpv_ml", "fnv_ml", "n_lesions", "n_lesions_detected",
                    "n_fp_components"]


def run(args, cwd=ROOT, timeout=600, env=None):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    proc = run(["main.py", "--preset=tiny", f"--out_dir={base / 'runs'}", "--run_name=tiny",
                f"--cache_dir={base / 'cache'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, base / "runs" / "tiny", proc


def test_run_directory_contract(tiny_run):
    base, run_dir, proc = tiny_run
    for name in ["config.json", "train.log", "metrics.jsonl", "curves.png", "split.json",
                 "checkpoints/last.pt", "checkpoints/best.pt", "eval/per_case.csv",
                 "eval/summary.json"]:
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["preset"] == "tiny" and "torch" in json.dumps(saved["environment"])
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True, map_location="cpu")
    assert {"model", "optimizer", "epoch", "step", "config"} <= set(ckpt)
    assert str(run_dir) in proc.stdout  # main prints the run directory at the end
    # no temporary file or folder is left behind anywhere (the writers use ".tmp-..." and
    # ".<name>.tmp" names)
    leftovers = [p for p in [*(base / "cache").rglob("*"), *run_dir.rglob("*")]
                 if ".tmp" in p.name or "-tmp-" in p.name or p.name.startswith(".old-")]
    assert not leftovers, leftovers


def test_evaluation_files(tiny_run):
    _, run_dir, _ = tiny_run
    split = json.loads((run_dir / "split.json").read_text())
    with open(run_dir / "eval" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[: len(PER_CASE_COLUMNS)] == PER_CASE_COLUMNS
    assert sorted(r["case_id"] for r in rows) == sorted(split["test"])
    predictions = sorted((run_dir / "eval" / "predictions").glob("*.nii.gz"))
    assert len(predictions) == len(rows)
    mask = nib.load(predictions[0])
    assert mask.get_fdata().max() <= 1 and len(mask.shape) == 3
    assert len(list((run_dir / "eval" / "overlays").glob("*.png"))) == len(rows)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["n_studies"] == len(rows)


def test_reevaluate_with_test_py(tiny_run):
    _, run_dir, _ = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "eval").iterdir()}
    proc = run(["test.py", f"--run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # same model, same numbers: reported as reproduced, main.py's eval/ left exactly as it was
    assert "identical to the evaluation already in" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "eval").iterdir()} == before
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("eval")) == ["eval"]


def test_a_reused_run_name_is_refused_before_anything_is_written(tiny_run):
    base, run_dir, _ = tiny_run
    files = ("config.json", "split.json", "cases.json", "train.log", "metrics.jsonl")
    before = {name: (run_dir / name).read_bytes() for name in files}
    proc = run(["main.py", "--preset=tiny", f"--out_dir={base / 'runs'}", "--run_name=tiny",
                f"--cache_dir={base / 'cache'}", "--n_test=3"])
    assert proc.returncode == 2 and "already exists" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert {name: (run_dir / name).read_bytes() for name in files} == before


def test_resume_with_other_settings_is_refused(tiny_run):
    _, run_dir, _ = tiny_run
    before = (run_dir / "config.json").read_bytes()
    proc = run(["main.py", f"--resume={run_dir}", "--lr=0.1", "--epochs=5"])
    assert proc.returncode == 2 and "--lr=0.1" in proc.stderr and "--epochs=5" in proc.stderr
    assert (run_dir / "config.json").read_bytes() == before


def test_a_bad_setting_exits_2_before_any_work(tmp_path):
    proc = run(["main.py", "--preset=tiny", "--model=nope", f"--out_dir={tmp_path / 'runs'}",
                f"--cache_dir={tmp_path / 'cache'}"], timeout=120)
    assert proc.returncode == 2 and "--model=nope" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arg", ["--model=nope", "--n_skip=7", "--loss_reduction=mean",
                                 "--val_every=0", "--eval_batch_size=0", "--threshold=1.5",
                                 "--lr=-1", "--w_dice=-1", "--model=unet_resnet34",
                                 "--aux_target=liver", "--amp=half"]
                         + ([] if torch.cuda.is_available() else ["--amp=fp16", "--amp=True"]))
def test_bad_settings_stop_before_any_work(tmp_path, arg):
    """In-process (main.main), each of the settings that used to fail late or not at all."""
    import config
    import main

    extra = ["--img_size=48"] if arg == "--model=unet_resnet34" else []  # smp needs 32 | size
    with pytest.raises(config.ConfigError) as err:
        main.main(["--preset=tiny", arg, *extra, f"--out_dir={tmp_path / 'runs'}",
                   f"--cache_dir={tmp_path / 'cache'}"])
    key = (extra or [arg])[0][2:].split("=")[0]
    assert f"--{key}" in str(err.value) or (key == "img_size" and "img_size" in str(err.value))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_an_objective_the_validation_studies_cannot_score_stops_before_training(tmp_path,
                                                                              monkeypatch):
    """pp_objective=mean_dice_fpv needs validation studies with and without tumour; one
    validation study is one or the other: refused after the data is prepared, before training."""
    import main
    import test as evaluation
    import training

    def train(**kwargs):
        raise AssertionError("trained before the objective was checked")

    monkeypatch.setattr(training, "train", train)
    with pytest.raises(evaluation.EvaluationError,
                       match="the validation studies: tune_postprocess with pp_objective=mean_dice_fpv"):
        main.main(["--preset=tiny", "--phantom_cases=4", "--n_val=1", "--tune_postprocess=True",
                   "--pp_objective=mean_dice_fpv", f"--out_dir={tmp_path / 'runs'}",
                   f"--cache_dir={tmp_path / 'cache'}"])


def test_every_bad_study_is_reported_before_training(tmp_path, tiny_autopet_dir):
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(tiny_autopet_dir, data)
    studies = sorted(p.parent for p in data.rglob("SUV.nii.gz"))
    (studies[0] / "CTres.nii.gz").write_bytes(b"not a nifti file")  # corrupt
    seg = nib.load(studies[2] / "SEG.nii.gz")  # a mask of the wrong shape
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), seg.affine), studies[2] / "SEG.nii.gz")
    proc = run(["main.py", "--preset=tiny", f"--data_dir={data}", f"--out_dir={tmp_path / 'runs'}",
                "--run_name=r", f"--cache_dir={tmp_path / 'cache'}", "--n_val=1", "--n_test=1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "2 of 6 studies" in proc.stderr
    assert studies[0].parent.name in proc.stderr and studies[2].parent.name in proc.stderr
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()


def test_missing_data_dir_is_a_clear_error(tmp_path):
    proc = run(["main.py", "--preset=tiny", f"--data_dir={tmp_path / 'nope'}",
                f"--out_dir={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'cache'}"])
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_torchrun_two_processes_on_cpu(tmp_path):
    """DDP with gloo on the CPU: two processes, one run directory, rank 0 writes everything."""
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
                "--preset=tiny", f"--out_dir={tmp_path / 'runs'}", "--run_name=ddp",
                f"--cache_dir={tmp_path / 'cache'}", "--save_overlays=False"],
               env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    run_dir = tmp_path / "runs" / "ddp"
    saved = json.loads((run_dir / "config.json").read_text())
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "eval" / "summary.json").is_file()
    log = (run_dir / "train.log").read_text()
    assert "2 process" in log and saved["config"]["preset"] == "tiny"


def test_resume_a_stopped_run_from_the_command_line(tmp_path):
    """SIGTERM during training, then `main.py --resume=<run>`: the run continues and finishes."""
    import signal
    import time

    args = [sys.executable, "main.py", "--preset=tiny", f"--out_dir={tmp_path / 'runs'}",
            "--run_name=r", f"--cache_dir={tmp_path / 'cache'}", "--save_overlays=False",
            "--epochs=40", "--steps_per_epoch=4", "--val_every=10"]
    run_dir = tmp_path / "runs" / "r"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)  # the first epoch has ended
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-2000:]  # 3: stopped by the signal, last.pt saved
    stopped = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert stopped["step"] < 160 and not (run_dir / "eval").exists()  # it did stop early
    resumed = run(["main.py", f"--resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 40 and ckpt["step"] == 160 and (run_dir / "eval" / "summary.json").is_file()


def test_main_run_table_reads_every_number_from_the_evidence(tiny_run, tmp_path):
    """bench/main_run.py's table.md (the README's `python main.py` table) from a run's files."""
    import shutil
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "bench"))
    import main_run

    _, run_dir, _ = tiny_run
    for name in main_run.EVIDENCE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / name, tmp_path / name)
    (tmp_path / "timing.json").write_text(json.dumps(
        {"command": "python main.py --preset=tiny", "wall_seconds": 123.0, "cpu_count": 2,
         "torch_threads": 2, "git_commit": "abcdef1234567"}))
    text = main_run.table(tmp_path)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert "**2.0 min**" in text and "`abcdef123456`" in text
    assert f"| Dice, tumour studies | {summary['metrics']['dice']['mean']:.3f}" in text
    les = summary["lesions"]
    assert f"{les['detected']} of {les['n_lesions']}" in text
    assert "Best checkpoint: epoch" in text and "mean of the weights" not in text
    assert "training step" not in text  # no bench_precision.txt: no sentence on the speed
    # the machine's speed, measured after the run, is quoted from bench_precision.txt
    (tmp_path / "bench_precision.txt").write_text(
        "torch 2.x, 2 threads, bf16 in hardware: True; ...\n"
        "float32  training step  0.368 s   inference of 32 slices  0.258 s (medians)\n"
        "bf16     training step  0.254 s   inference of 32 slices  0.151 s (medians)\n"
        "ratio float32/bf16 training step: 1.45x\n")
    assert main_run.step_times((tmp_path / "bench_precision.txt").read_text()) == {
        "float32": 0.368, "bf16": 0.254}
    assert "median): float32 0.368 s, bf16 0.254 s." in main_run.table(tmp_path)
    # a second reading appended by hand does not replace the one taken right after the run
    with open(tmp_path / "bench_precision.txt", "a") as f:
        f.write("float32  training step  0.498 s\nbf16     training step  0.401 s\n")
    assert "median): float32 0.368 s, bf16 0.254 s." in main_run.table(tmp_path)
    (tmp_path / "bench_precision.txt").unlink()
    # an evaluation of averaged weights names the epochs it averaged, not the best epoch
    summary["settings"].update(checkpoint="average0.75", averaged_epochs=[3, 4])
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary))
    text = main_run.table(tmp_path)
    assert "Scored: the mean of the weights of epochs 3, 4 (the validation pseudo-Dice would " \
           "have chosen epoch" in text and "Best checkpoint" not in text


def test_main_run_compare_pairs_two_runs_on_their_test_studies(tiny_run, tmp_path):
    """bench/main_run.py --compare: a run against itself with every tumour study's Dice raised by
    0.1 gives a paired difference of exactly +0.1 (CI [0.1, 0.1]) and FPV +0; other test
    studies are refused."""
    import shutil
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "bench"))
    import main_run

    _, run_dir, _ = tiny_run
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        for name in main_run.EVIDENCE:
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, d / name)
        (d / "timing.json").write_text(json.dumps({"command": f"python main.py --{d.name}"}))
    with open(a / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tumour = [r for r in rows if r["has_tumor"] == "True"]
    assert tumour and all(float(r["dice"]) <= 0.9 for r in tumour)
    for r in tumour:
        r["dice"] = str(float(r["dice"]) + 0.1)
    with open(a / "eval" / "per_case.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = main_run.compare(a, b)
    dice = next(line for line in text.splitlines() if line.startswith("| raw | Dice"))
    assert f"({len(tumour)})" in dice and "| +0.100 [+0.100, +0.100] |" in dice, text
    fpv = next(line for line in text.splitlines() if line.startswith("| raw | FPV"))
    assert "| +0.000 [+0.000, +0.000] | 1 | no difference |" in fpv, text
    # a runs_table evidence folder (no timing.json) is named by its folder, not a traceback
    (b / "timing.json").unlink()
    assert text.replace("`python main.py --b`", "`run b`") == main_run.compare(a, b)
    split = json.loads((b / "split.json").read_text())
    split["test"] = split["test"][1:]
    (b / "split.json").write_text(json.dumps(split))
    with pytest.raises(SystemExit, match="test studies differ"):
        main_run.compare(a, b)


def test_export_onnx_of_a_tiny_run_matches_pytorch(tiny_run, tmp_path):
    """`python test.py --run_dir=R --export_onnx=PATH`: the run's model as ONNX (dynamic batch),
    run with ONNX Runtime on slices of the run's test studies: the logits agree with PyTorch."""
    proc = run(["test.py", f"--run_dir={tiny_run[1]}", f"--export_onnx={tmp_path / 'model.onnx'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model.onnx").stat().st_size > 10_000
    diff = float(proc.stdout.split("test slices (ONNX Runtime, CPU): ")[1].split()[0])
    assert diff < 1e-4, proc.stdout


def test_main_run_refuses_an_out_folder_that_holds_evidence(tmp_path):
    """bench/main_run.py measures into a new folder: earlier evidence is never overwritten."""
    sys.path.insert(0, str(ROOT / "bench"))
    import main_run

    main_run.check_new_out(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    main_run.check_new_out(tmp_path / "empty")  # empty: fine
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds evidence \\(config.json"):
        main_run.check_new_out(tmp_path / "old")
