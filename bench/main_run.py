"""The README's `python main.py` result, measured as a new user gets it, and its evidence.

    python bench/main_run.py --out=results/main_cpu          # time `python main.py` from scratch
    python bench/main_run.py --out=results/main_cpu --screenshot=docs/report_screenshot.png
    python bench/main_run.py --out=results/main_cpu --table_only   # re-render table.md from it
    python bench/main_run.py --out=results/cpu_long --keep=runs/cpu_long -- --preset=cpu_long
    python bench/main_run.py --out=results/cpu_long --table_only --compare=results/cpu_uptake_ema
    python sweep.py --sync_readme                             # the README's copy of table.md

Runs `python main.py` exactly as the README gives it, with a fresh, empty cache folder (so the
phantom is generated afresh and every study preprocessed: the whole cost a new user pays) and
its own run directory; times the whole command (wall clock); then copies the run's evidence
(config.json with the environment and commit, split.json, metrics.jsonl, train.log,
eval/summary.json, eval/per_case.csv, eval/lesions.csv; no weights, no images) into --out and
writes `timing.json` and `table.md` (the table the README shows, every number read from those
files). Extra arguments after `--` go to main.py. After the timed command (outside its wall time)
it runs `bench/bench_precision.py` into `bench_precision.txt`: this machine's training-step time,
which the table quotes, so that wall times measured on CPUs of different speed can be compared
(`--no_speed_probe` skips it).

`--compare=REF` also writes `compare.md`: this run against the evidence folder REF on the same
test studies (refused otherwise), paired over the studies by sweep.py's paired tests
(sweep.compare_runs: bootstrap CI of the mean difference, Wilcoxon signed-rank), Dice
over the tumour studies and false-positive volume over the tumour-free ones, of the raw masks
and, where both runs post-process, of the post-processed ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ("config.json", "split.json", "metrics.jsonl", "train.log", "eval/summary.json",
            "eval/per_case.csv", "eval/lesions.csv")


def run_main(out: Path, extra: list[str], screenshot: str | None = None,
             keep: str | None = None, speed_probe: bool = True) -> None:
    work = Path(tempfile.mkdtemp(prefix="main-run-"))
    args = [sys.executable, "main.py", f"--cache_dir={work / 'cache'}",
            f"--out_dir={work / 'runs'}", "--run_name=main", *extra]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "stdout.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"main.py exited {proc.returncode}")
    run_dir = work / "runs" / "main"
    for name in EVIDENCE:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / name, out / name)
    env = json.loads((run_dir / "config.json").read_text())["environment"]
    timing = {"command": "python main.py " + " ".join(extra), "wall_seconds": round(wall, 1),
              "cpu_count": os.cpu_count(), "torch_threads": env.get("torch_threads"),
              "platform": platform.platform(), "git_commit": env.get("git_commit"),
              "load_average_after": list(os.getloadavg())}
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    if screenshot:  # the run's own report, before its folder goes
        sys.path.insert(0, str(ROOT / "bench"))
        from report_demo import screenshot as take

        take(run_dir / "eval" / "report.html", Path(screenshot))
        print(f"screenshot of {run_dir / 'eval' / 'report.html'}: {screenshot}")
    if keep:  # the whole run directory (weights included), e.g. for bench/learning_curve.py
        shutil.move(str(run_dir), keep)
        print(f"run directory kept: {keep} (its cache folder was temporary and is removed: "
              "give test.py and bench/learning_curve.py --cache_dir=cache, or any folder, "
              "to prepare its studies again)")
    shutil.rmtree(work, ignore_errors=True)
    if speed_probe:  # after the timed command, so outside its wall time
        probe = subprocess.run([sys.executable, "bench/bench_precision.py"], cwd=ROOT,
                               capture_output=True, text=True)
        (out / "bench_precision.txt").write_text(probe.stdout + probe.stderr)


def step_times(text: str) -> dict[str, float]:
    """The median training-step times of bench/bench_precision.py's output, by precision; of
    several readings in one file (a probe repeated by hand), the first, taken right after the run."""
    steps: dict[str, float] = {}
    for m in re.finditer(r"^(float32|bf16)\s+training step\s+([0-9.]+) s", text, re.MULTILINE):
        steps.setdefault(m.group(1), float(m.group(2)))
    return steps


def _speed(out: Path) -> str:
    """The table's sentence on this machine's speed, from `bench_precision.txt` if the folder
    has one (evidence folders from before the probe have none: no sentence)."""
    probe = out / "bench_precision.txt"
    steps = step_times(probe.read_text()) if probe.is_file() else {}
    if not steps:
        return ""
    return (" This machine's training step (`bench/bench_precision.py` right after the run, "
            "transunet_small batch 16 at 128², median): "
            + ", ".join(f"{k} {v:.3f} s" for k, v in steps.items()) + ".")


def _ci(entry: dict, digits: int = 3) -> str:
    bounds = entry.get("ci95")
    return f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else ""


def table(out: Path) -> str:
    """table.md from the evidence in `out`."""
    summary = json.loads((out / "eval" / "summary.json").read_text())
    timing = json.loads((out / "timing.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "config.json").read_text())["config"]
    split = json.loads((out / "split.json").read_text())
    m, les = summary["metrics"], summary["lesions"]
    n = lambda key: m[key]["n"]  # noqa: E731
    minutes = timing["wall_seconds"] / 60
    commit = (timing.get("git_commit") or "unknown")[:12]
    train_s = sum(r.get("seconds", 0.0) for r in history)
    best = max((r for r in history if r.get("val_pseudo_dice") is not None),
               key=lambda r: r["val_pseudo_dice"], default=None)
    lines = [
        f"`{timing['command'].strip()}`: **{minutes:.1f} min** wall in all on "
        f"{timing['cpu_count']} CPU cores ({timing['torch_threads']} torch threads), phantom "
        f"generated afresh; training and validation {train_s / 60:.1f} min, "
        f"{history[-1]['step']} steps of batch {cfg['batch_size']}; "
        f"{len(split['train'])} training / {len(split['val'])} validation studies, "
        f"{summary['n_studies']} test studies of a phantom seed the model never saw; commit "
        f"`{commit}`."
        + _scored_weights(summary.get("settings", {}), best) + _speed(out),
        "",
        "| metric | value (95 % bootstrap CI) | studies |",
        "|---|---|---|",
        f"| Dice, tumour studies | {m['dice']['mean']:.3f}{_ci(m['dice'])} | {n('dice')} |",
        f"| false-positive volume, tumour-free studies | {m['fpv_ml_tumor_free']['mean']:.2f} ml"
        f"{_ci(m['fpv_ml_tumor_free'], 2)} | {n('fpv_ml_tumor_free')} |",
        f"| false-negative volume, tumour studies | {m['fnv_ml']['mean']:.2f} ml"
        f"{_ci(m['fnv_ml'], 2)} | {n('fnv_ml')} |",
        f"| lesions detected (Dice >= 0.1) | {les['detected']} of {les['n_lesions']} "
        f"(recall {les['recall']:.2f}), {les['false_positive_components']} false-positive "
        f"components, F1 {les['f1']:.2f} | {summary['n_studies']} |",
        f"| HD95, tumour studies | {m['hd95_mm']['mean']:.1f} mm | {n('hd95_mm')} "
        f"({summary.get('n_distance_penalty', 0)} with the empty-prediction penalty) |",
    ]
    post = summary.get("postprocessed")
    if post:
        pm, pl = post["metrics"], post["lesions"]
        chosen = summary.get("threshold_tuning", {}).get("chosen")
        lines += ["", "After the post-processing" + (f" chosen on the validation studies "
                  f"({', '.join(f'{k} {v:g}' for k, v in chosen.items())})" if chosen else "")
                  + f": Dice {pm['dice']['mean']:.3f}{_ci(pm['dice'])}, false-positive volume "
                  f"{pm['fpv_ml_tumor_free']['mean']:.2f} ml, lesion recall {pl['recall']:.2f}, "
                  f"{pl['false_positive_components']} false-positive components."]
    return "\n".join(lines) + "\n"


def _scored_weights(settings: dict, best: dict | None) -> str:
    """Which weights the evaluation scored: the mean of the kept epochs (a run with
    average_from, test.py --checkpoint=average) or the validation-chosen epoch."""
    if str(settings.get("checkpoint", "")).startswith("average"):
        epochs = settings.get("averaged_epochs") or []
        return (f" Scored: the mean of the weights of epochs {', '.join(map(str, epochs))}"
                + (f" (the validation pseudo-Dice would have chosen epoch {best['epoch']}, "
                   f"{best['val_pseudo_dice']:.3f})." if best else "."))
    return (f" Best checkpoint: epoch {best['epoch']} (validation pseudo-Dice "
            f"{best['val_pseudo_dice']:.3f})." if best else "")


def compare(out: Path, ref: Path) -> str:
    """compare.md: the run in `out` (a) against the run in `ref` (b), paired over their test
    studies by sweep.compare_runs (one seed each); both folders hold main_run evidence or
    bench/runs_table.py evidence (the same files without timing.json)."""
    sys.path.insert(0, str(ROOT))
    import sweep

    if sweep.run_test_studies(out) != sweep.run_test_studies(ref):
        raise SystemExit(f"--compare={ref}: its test studies differ from {out}'s "
                         "(split.json); only runs scored on the same studies are paired")
    # main_run evidence names its command (timing.json); runs_table evidence (no timing) its run
    names = [json.loads((d / "timing.json").read_text())["command"].strip()
             if (d / "timing.json").exists() else f"run {d.name}" for d in (out, ref)]
    both_pp = all("postprocessed" in json.loads((d / "eval" / "summary.json").read_text())
                  for d in (out, ref))
    lines = [f"a = `{names[0]}` ({out.name}), b = `{names[1]}` ({ref.name}); paired over the "
             "same test studies, Δ = a − b, 95 % CI a percentile bootstrap over studies "
             f"({sweep.PAIRED_N_BOOTSTRAP} resamples, seed 0), p the two-sided Wilcoxon "
             "signed-rank test; one training run each, so the test holds both models fixed.",
             "", "| masks | metric (studies) | a | b | Δ [95 % CI] | p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for post in (False, True) if both_pp else (False,):
        row_a, row_b = (dict(config=d.name, machine="", seed=0, postprocessed=post)
                        for d in (out, ref))
        entries = sweep.compare_runs([(row_a, out)], [(row_b, ref)])
        for e, (_, _, _, label) in zip(entries, sweep.PAIRED_METRICS):
            lines.append(f"| {'post-processed' if post else 'raw'} | {label} ({e['n']}) | "
                         f"{e['mean_config']:.3f} | {e['mean_reference']:.3f} | "
                         f"{e['mean_diff']:+.3f} [{e['ci95_low']:+.3f}, {e['ci95_high']:+.3f}] | "
                         f"{e['wilcoxon_p']:.3g} | {e['verdict']} |")
    return "\n".join(lines) + "\n"


def check_new_out(out: Path) -> None:
    """A measured run's evidence is never overwritten: --out must be new or empty (rename or
    move the earlier evidence first; --table_only re-renders an existing folder)."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out={out} already holds evidence ({', '.join(sorted(p.name for p in out.iterdir())[:4])}"
                         f"...); give a new folder, or --table_only to re-render its table")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder for the evidence")
    parser.add_argument("--table_only", action="store_true", help="only re-render table.md")
    parser.add_argument("--screenshot", default=None,
                        help="also a PNG of the run's eval/report.html (needs chromium)")
    parser.add_argument("--keep", default=None,
                        help="move the run directory (weights too) to this new folder instead "
                             "of deleting it")
    parser.add_argument("--no_speed_probe", action="store_true",
                        help="skip bench/bench_precision.py after the run")
    parser.add_argument("--compare", default=None,
                        help="also compare.md: this run paired against the evidence folder REF")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.table_only:
        check_new_out(out)
        if args.keep and Path(args.keep).exists():
            raise SystemExit(f"--keep={args.keep} exists; give a new folder")
        out.mkdir(parents=True, exist_ok=True)
        run_main(out, extra, args.screenshot, args.keep, not args.no_speed_probe)
    (out / "table.md").write_text(table(out))
    print((out / "table.md").read_text())
    if args.compare:
        (out / "compare.md").write_text(compare(out, Path(args.compare)))
        print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
