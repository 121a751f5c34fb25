"""Benchmark: in-plane handling "resize" against "patch" (issue #15 item 1), side by side.

    OMP_NUM_THREADS=1 python bench/bench_inplane.py          # ~20 min on 2 shared CPU cores
    OMP_NUM_THREADS=1 python bench/bench_inplane.py --epochs=2 --n_test=2   # a quicker look
    nohup env OMP_NUM_THREADS=1 python bench/bench_inplane.py > results/inplane/bench.txt 2>&1 &

The same run twice through `main.main` (training, then `test.evaluate` of the last checkpoint on
the run's test studies), differing only in `--inplane`:
- resize: each 256² slice of the `autopet` phantom (2.04 mm) resized to 128² (4.07 mm pixels);
- patch: 128² crops at the native 2.04 mm for training, sliding-window tiles (overlap
  `--patch_overlap`, Gaussian-weighted) at inference.
Same model (`transunet_small`, the cpu preset), optimiser, schedule, number of optimiser steps,
batch size, seed, phantom and split (`--n_val=0`: no validation, so the evaluated checkpoint is
the last one in both modes and the epoch time is training time only). Prints, per mode, the
seconds per optimiser step, the evaluation time, the test Dice (tumour studies), FPV (ml, on
tumour-free studies) and the lesion recall / precision (Dice >= 0.1 detection rule,
docs/evaluation.md), then the command and the git commit. On 2 CPU cores this is a short
budget (300 steps): it compares the two paths at equal work, it is not a converged result.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
import config  # noqa: E402
import factory  # noqa: E402
import main  # noqa: E402
import runtime  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps_per_epoch", type=int, default=50)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--img_size", type=int, default=128)
    ap.add_argument("--phantom_size", default="autopet", help="unit for a machinery check")
    ap.add_argument("--phantom_cases", type=int, default=24)
    ap.add_argument("--n_test", type=int, default=6)
    ap.add_argument("--patch_overlap", type=float, default=0.5)
    ap.add_argument("--modes", default="resize,patch")
    ap.add_argument("--cache_dir", default="cache/bench_inplane")
    ap.add_argument("--out_dir", default="runs/bench_inplane")
    return ap.parse_args(argv)


def common_settings(args: argparse.Namespace) -> list[str]:
    """The settings both modes share (everything but --inplane and --patch_overlap)."""
    return [f"--epochs={args.epochs}", f"--steps_per_epoch={args.steps_per_epoch}",
            f"--batch_size={args.batch_size}", f"--img_size={args.img_size}",
            "--model=transunet_small", f"--phantom_size={args.phantom_size}",
            f"--phantom_cases={args.phantom_cases}", "--n_val=0", f"--n_test={args.n_test}",
            "--warmup_steps=30", "--seed=0", "--split_seed=0", "--n_bootstrap=200",
            "--save_overlays=False", f"--cache_dir={args.cache_dir}", f"--out_dir={args.out_dir}"]


def run_mode(mode: str, args: argparse.Namespace, stamp: str) -> dict:
    """Train + evaluate one mode; the figures of its row."""
    extra = [f"--inplane={mode}"] + ([f"--patch_overlap={args.patch_overlap}"] if mode == "patch" else [])
    name = f"{mode}-{stamp}"
    argv = ["--preset=cpu", *common_settings(args), *extra, f"--run_name={name}"]
    print(f"== {mode}: python main.py {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    outcome = main.main(argv)
    wall = time.perf_counter() - start
    run_dir = Path(outcome["run_dir"])
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = epochs[-1]["step"]
    train_s = sum(e["seconds"] for e in epochs)  # no validation: training time only
    summary = outcome["eval"]
    m, lesions = summary["metrics"], summary["lesions"]
    return {"mode": mode, "steps": steps, "batch": args.batch_size, "s_per_step": train_s / steps,
            "train_s": train_s, "wall_s": wall, "eval_s": wall - train_s,  # evaluation + set-up
            "dice": m["dice"]["mean"], "dice_n": m["dice"]["n"],
            "fpv_ml": m["fpv_ml_tumor_free"]["mean"], "fpv_n": m["fpv_ml_tumor_free"]["n"],
            "lesion_recall": lesions["recall"], "lesion_precision": lesions["precision"],
            "n_lesions": lesions["n_lesions"], "final_train_loss": epochs[-1]["train_loss"],
            "run_dir": str(run_dir)}


def print_table(rows: list[dict]) -> None:
    print("\n| mode | steps x batch | s / step | eval + set-up s | test Dice (n) | FPV ml tumour-free (n) "
          "| lesion recall | lesion precision | final train loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['steps']} x {r['batch']} | {r['s_per_step']:.2f} | "
              f"{r['eval_s']:.0f} | {r['dice']:.3f} ({r['dice_n']}) | {r['fpv_ml']:.2f} ({r['fpv_n']}) | "
              f"{r['lesion_recall']:.3f} of {r['n_lesions']} | {r['lesion_precision']:.3f} | "
              f"{r['final_train_loss']:.4f} |")


def run(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"bench_inplane at git commit {runtime.git_commit()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), started {stamp}")
    print(f"command: OMP_NUM_THREADS={torch.get_num_threads()} python bench/bench_inplane.py "
          f"{' '.join(argv)}", flush=True)
    start = time.perf_counter()
    cfg = config.parse_cli(["--preset=cpu", *common_settings(args)])
    factory.prepare_data(cfg)  # phantom + cache once, so that neither mode's time includes it
    print(f"phantom and cache ready in {time.perf_counter() - start:.0f} s", flush=True)
    rows = [run_mode(mode, args, stamp) for mode in args.modes.split(",")]
    print_table(rows)
    for r in rows:
        print(json.dumps(r))
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    with runtime.exit_on_user_error():
        run(sys.argv[1:])
