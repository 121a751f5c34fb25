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
    # nothing was written next to the phantom's studies except the studies themselves
    assert not list((base / "cache").rglob("*.tmp"))


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
    before = (run_dir / "eval" / "per_case.csv").read_text()
    proc = run(["test.py", f"--run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "eval" / "per_case.csv").read_text() == before  # same model, same numbers


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
            "--epochs=3", "--steps_per_epoch=4"]
    run_dir = tmp_path / "runs" / "r"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)  # the first epoch has ended
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode in (0, 3), out[-2000:]  # 3: stopped by the signal, last.pt saved
    resumed = run(["main.py", f"--resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 3 and (run_dir / "eval" / "summary.json").is_file()
