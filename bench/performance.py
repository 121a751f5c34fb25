"""The project's performance figures in one run: every ratio measured side by side.

    python bench/performance.py            # ~6-8 min on 2 CPU cores
    python bench/performance.py --quick    # fewer repeats, ~3-4 min (noisier)
    python bench/performance.py --with_preprocess   # + peak memory 5 vs 20 autoPET-size studies (+5 min)
    python bench/performance.py --out=results/cpu2core/performance.md   # + the table as a file
                                                    # (the README's Speed block: sweep.py --sync_readme)

Runs the benchmark scripts of bench/ one after another, each in its own process (so one's
memory and threads do not affect the next), keeps their full output, and prints the ratio each
one measures side by side:

| figure                                   | script              | what is compared            |
|------------------------------------------|---------------------|-----------------------------|
| model step time                          | bench_model.py      | TransUNet R50-ViT-B/16 vs smp Unet(resnet50), interleaved steps |
| bf16 autocast speed-up                   | bench_precision.py  | transunet_small step and inference, float32 vs bf16, interleaved |
| loader throughput vs model consumption   | bench_loader.py     | slices/s of the loader vs of a training step |
| metric speed-up                          | bench_metrics.py    | MedPy hd95+assd on the full volume vs metrics.case_metrics (crop) |
| preprocessing memory (optional)          | bench_preprocess.py | peak RSS for 5 vs 20 studies |

A ratio is only meaningful from one run: both sides share the machine's load at that moment.
The CUDA figures are in bench/bench_cuda.py (needs a GPU).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# (figure, script, arguments (full, quick), regular expression for the ratio line(s))
FIGURES = [
    ("model step: TransUNet R50-ViT-B/16 / smp Unet(resnet50)", "bench_model.py",
     (["--steps=3"], ["--steps=2"]), r"ratio TransUNet / Unet\(resnet50\): ours ([\d.]+)x"),
    ("training step of transunet_small: float32 / bf16 autocast", "bench_precision.py",
     ([], ["--steps=3"]), r"ratio float32/bf16 training step: ([\d.]+)x"),
    ("inference of transunet_small: float32 / bf16 autocast", "bench_precision.py", None,
     r"ratio float32/bf16 inference: ([\d.]+)x"),
    ("loader / model consumption, num_workers=0", "bench_loader.py",
     ([], ["--n_studies=4", "--batches=15", "--steps=3"]),
     r"ratio loader/model \(num_workers=0\):\s+([\d.]+)x"),
    ("loader / model consumption, num_workers=2", "bench_loader.py", None,
     r"ratio loader/model \(num_workers=2\):\s+([\d.]+)x"),
    ("metrics: MedPy full volume / case_metrics crop, lesions in one region", "bench_metrics.py",
     ([], ["--repeats=1"]), r"one region\s+identical: True; speed-up ([\d.]+)x"),
    ("metrics: MedPy full volume / case_metrics crop, lesions spread", "bench_metrics.py", None,
     r"spread\s+identical: True; speed-up ([\d.]+)x"),
]
PREPROCESS = ("preprocessing peak memory, 20 / 5 autoPET-size studies", "bench_preprocess.py",
              ([], []), r"ratio \d+ vs \d+ studies: peak RSS x([\d.]+)")


def run_script(script: str, args: list[str]) -> tuple[str, float, int]:
    """Its whole output, its wall time and its exit status."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True)
    return proc.stdout + proc.stderr, time.perf_counter() - t0, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--with_preprocess", action="store_true")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here, with "
                        "the commit, machine and load average it ran at")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    figures = FIGURES + ([PREPROCESS] if args.with_preprocess else [])
    outputs: dict[str, tuple[str, float, int]] = {}
    summary = []
    for figure, script, arguments, pattern in figures:
        if arguments is not None:  # None: a second figure from the script's previous run
            chosen = arguments[1] if args.quick else arguments[0]
            print(f"== {script} {' '.join(chosen)}", flush=True)
            outputs[script] = run_script(script, chosen)
            print(outputs[script][0].rstrip(), flush=True)
        text, seconds, code = outputs[script]
        match = re.search(pattern, text)
        value = f"{float(match.group(1)):.2f}x" if match else f"not measured (exit {code})"
        summary.append((figure, value, script, seconds))
    table = ["| figure | ratio | script (wall s) |", "|---|---|---|"]
    table += [f"| {figure} | {value} | {script} ({seconds:.0f} s) |"
              for figure, value, script, seconds in summary]
    print("\n" + "\n".join(table))
    if args.out:
        sys.path.insert(0, str(BENCH.parent))
        import runtime

        commit = runtime.git_commit() or "unknown"
        commit = commit[:12] + (" with uncommitted changes" if commit.endswith("+dirty") else "")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            f"`python bench/performance.py{' --quick' if args.quick else ''}` at commit "
            f"`{commit}`, {os.cpu_count()} CPU cores "
            f"({platform.processor() or platform.machine()}), 1-min load average "
            f"{load_before:.2f} before and {os.getloadavg()[0]:.2f} after:\n\n"
            + "\n".join(table) + "\n")
    if any("not measured" in value for _, value, _, _ in summary):
        sys.exit(1)


if __name__ == "__main__":
    main()
