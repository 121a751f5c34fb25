"""The study: a named grid of configurations run through the normal `main.py` path, each seed in
its own run directory, resumable (finished runs are skipped), collected into a leaderboard.

    python sweep.py --grid=study --budget=cpu              # >= 23 configurations (hours on 2 CPU cores)
    python sweep.py --grid=headline --budget=cpu           # BCE vs published vs corrected, 3 seeds
    python sweep.py --grid=study --budget=gpu              # the same grid, longer training, on a GPU
    python sweep.py --grid=study --budget=cpu --collect_only   # rebuild results/ from finished runs
    python sweep.py --grid=study --budget=cpu --parallel=4     # 4 runs at a time (a GPU machine)
    python sweep.py --grid=study --budget=cpu --only=unet_resnet34,fpn_resnet34   # a subset
    python sweep.py --grid=study --budget=cpu --export=results/mine/runs   # + the runs' evidence
    python sweep.py --grid=study --budget=cpu --collect_only --out=results \
        --runs_dir=results/h200/runs,results/cpu2core/runs      # one leaderboard, two machines

Options (any other --key=value is a config.py setting applied to every run):
    --grid=study|headline  --budget=cpu|gpu|smoke  --seeds=0,1,2  --only=NAME,NAME
    --runs_dir=DIR[,DIR]   run directories go to DIR/<grid>-<budget>/<config>-s<seed>/; with several
                           DIRs (--collect_only) a run found in each gives one row per machine
    --results_dir=DIR      leaderboard goes to DIR/<grid>-<budget>/ (or exactly --out=DIR)
    --export=DIR           copy each collected run's evidence (config, split, metrics, log,
                           eval summary and per-case CSV; no weights) to DIR/<grid>-<budget>/
    --parallel=N  --collect_only  --dry_run
    --sync_readme          copy the results files into the README blocks that name them

Writes `leaderboard.{csv,md,png}`: one CSV row per configuration, seed and machine; the table
gives mean ± SD over seeds per configuration and machine, and paired differences against the
published loss (same seed, same machine). Rules followed (docs/study.md): every configuration of
a budget trains for the same number of optimiser steps with the same batch and schedule; the data
split is fixed (`split_seed`), seeds change the initialisation and the sampling; test studies are
never used to choose anything (checkpoints are chosen on validation studies).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import config

# ---- configurations -----------------------------------------------------------------------
# Loss settings are written out in full for each configuration so that a leaderboard row never
# depends on a default that might change later.
BCE = dict(w_bce=1.0, w_tversky=0.0, w_dice=0.0)
DICE = dict(w_bce=0.0, w_tversky=0.0, w_dice=1.0, dice_log=False)
PUBLISHED = dict(w_bce=0.6, w_tversky=0.4, w_dice=0.6, tversky_weighting="published",
                 tversky_fp_weight=0.5, tversky_fn_weight=0.5, tversky_gamma=1.0, dice_log=True)
CORRECTED = dict(w_bce=0.6, w_tversky=0.4, w_dice=0.6, tversky_weighting="corrected",
                 tversky_fp_weight=0.5, tversky_fn_weight=0.5, tversky_gamma=1.0, dice_log=True)


def focal_tversky(alpha: float, beta: float, gamma: float, weighting: str = "none") -> dict:
    return dict(w_bce=0.0, w_tversky=1.0, w_dice=0.0, tversky_fp_weight=alpha,
                tversky_fn_weight=beta, tversky_gamma=gamma, tversky_weighting=weighting)


HEADLINE = {
    # the fair BCE baseline (docs/study.md): positive-class weight and a threshold chosen on validation
    "bce_posweight": {**BCE, "bce_pos_weight": 50.0, "tune_threshold": True},
    "published_combined": PUBLISHED,
    "corrected_combined": CORRECTED,
}

STUDY = {
    # losses, TransUNet of the `cpu` preset
    "bce": BCE,
    **HEADLINE,
    "dice": DICE,
    "dice_log": {**DICE, "dice_log": True},
    "bce_dice": dict(w_bce=0.5, w_tversky=0.0, w_dice=0.5, dice_log=False),  # TransUNet recipe
    "bce_logdice": dict(w_bce=0.5, w_tversky=0.0, w_dice=0.5, dice_log=True),
    "tversky_a0.5_b0.5": focal_tversky(0.5, 0.5, 1.0),
    "tversky_a0.3_b0.7": focal_tversky(0.3, 0.7, 1.0),
    "focal_tversky_a0.3_b0.7_g0.75": focal_tversky(0.3, 0.7, 0.75),  # Abraham & Khan's 1/gamma=4/3
    "focal_tversky_a0.3_b0.7_g2": focal_tversky(0.3, 0.7, 2.0),
    "focal_tversky_published_weighting": focal_tversky(0.5, 0.5, 1.0, "published"),
    "focal_tversky_corrected_weighting": focal_tversky(0.5, 0.5, 1.0, "corrected"),
    "published_combined_plain_dice": {**PUBLISHED, "dice_log": False},
    "corrected_combined_a0.3_b0.7": {**CORRECTED, "tversky_fp_weight": 0.3, "tversky_fn_weight": 0.7},
    "corrected_combined_sample_reduction": {**CORRECTED, "loss_reduction": "sample"},
    # sampler
    "bce_dice_no_oversampling": dict(w_bce=0.5, w_tversky=0.0, w_dice=0.5, dice_log=False,
                                     fg_fraction=0.0),
    "published_combined_no_oversampling": {**PUBLISHED, "fg_fraction": 0.0},
    "corrected_combined_no_oversampling": {**CORRECTED, "fg_fraction": 0.0},
    # beyond the paper: 2.5-D input
    "corrected_combined_2.5d": {**CORRECTED, "context_slices": 1},
    # architectures, corrected combined loss
    "unet_resnet18": {**CORRECTED, "model": "unet_resnet18"},
    "unet_resnet34": {**CORRECTED, "model": "unet_resnet34"},
    "unetplusplus_resnet34": {**CORRECTED, "model": "unetplusplus_resnet34"},
    "fpn_resnet34": {**CORRECTED, "model": "fpn_resnet34"},
    "deeplabv3plus_resnet34": {**CORRECTED, "model": "deeplabv3plus_resnet34"},
    "segformer_mit_b0": {**CORRECTED, "model": "segformer_mit_b0"},
    # the U-Net closest in cost to transunet_small (6.6 M parameters, 1.7 GFLOP per 128^2
    # slice, against 2.4 M and 0.53): the ResNet-34 baselines above cost 7-17x its FLOPs
    "unet_mobilenet_v2": {**CORRECTED, "model": "unet_mobilenet_v2"},
}

GRIDS = {"study": STUDY, "headline": HEADLINE}
HEADLINE_SEEDS = (0, 1, 2)

# ---- budgets: the same work for every configuration of a budget ---------------------------
_STUDY_DATA = dict(phantom_cases=100, phantom_size="demo", n_val=10, n_test=50, split_seed=0,
                   save_overlays=False)
BUDGETS = {
    # ~400 optimiser steps of batch 16 per run on 2 CPU cores
    "cpu": dict(preset="cpu", epochs=8, steps_per_epoch=50, batch_size=16, warmup_steps=30,
                **_STUDY_DATA),
    # the same grid with 3x the steps, for a GPU (add --parallel=4 --num_workers=3 there)
    "gpu": dict(preset="cpu", epochs=12, steps_per_epoch=100, batch_size=16, warmup_steps=60,
                **_STUDY_DATA),
    # machinery check (tests): seconds per run
    "smoke": dict(preset="tiny", epochs=1, steps_per_epoch=2, batch_size=2, phantom_cases=8,
                  n_val=2, n_test=2, n_bootstrap=20, save_overlays=False),
}


def run_plan(grid: str, seeds: tuple[int, ...] | None,
             only: tuple[str, ...] = ()) -> list[tuple[str, int, dict]]:
    """(configuration, seed, overrides) for every run: headline configurations get 3 seeds.
    `only` keeps the named configurations, in that order."""
    plan = []
    names = only or tuple(GRIDS[grid])
    unknown = set(names) - set(GRIDS[grid])
    if unknown:
        raise config.ConfigError(f"--only: {sorted(unknown)} not in grid {grid!r}")
    for name in names:
        overrides = GRIDS[grid][name]
        run_seeds = seeds or (HEADLINE_SEEDS if name in HEADLINE else (0,))
        plan += [(name, seed, overrides) for seed in run_seeds]
    return plan


def run_settings(name: str, seed: int, overrides: dict, budget: str, runs_dir: Path,
                 extra: dict) -> dict:
    settings = {**BUDGETS[budget], **overrides, **extra, "seed": seed,
                "out_dir": str(runs_dir), "run_name": f"{name}-s{seed}"}
    config.make_config(settings)  # a bad grid entry fails here, before any training
    return settings


def start_run(settings: dict, log_path: Path) -> subprocess.Popen:
    """`python main.py ...` for one run (or its resume), output to the run's sweep.log."""
    run_dir = Path(settings["out_dir"]) / settings["run_name"]
    if (run_dir / "checkpoints" / "last.pt").exists():
        args = [f"--resume={run_dir}"]
    else:
        args = [f"--{key}={value!r}" if isinstance(value, str) else f"--{key}={value}"
                for key, value in settings.items()]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return subprocess.Popen([sys.executable, "main.py", *args], cwd=Path(__file__).parent,
                                stdout=log, stderr=subprocess.STDOUT)


def run_all(plan: list[tuple[str, int, dict]], budget: str, runs_dir: Path, extra: dict,
            parallel: int) -> None:
    """Every unfinished run of the plan, `parallel` at a time; finished runs are skipped."""
    todo = [run_settings(name, seed, overrides, budget, runs_dir, extra)
            for name, seed, overrides in plan
            if not (runs_dir / f"{name}-s{seed}" / "eval" / "summary.json").exists()]
    if not todo:
        return
    prepare_data_once(todo[0])
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed = []
    # SIGTERM (e.g. `timeout`) ends the sweep like Ctrl-C: the runs get SIGTERM too, save
    # last.pt and are resumed by the next sweep command
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _supervise(todo, running, failed, runs_dir, parallel)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.wait(timeout=120)
        raise SystemExit("sweep interrupted: rerun the same command to continue")
    if failed:
        raise SystemExit(f"error: runs {failed} failed (logs in {runs_dir / 'logs'}); fix and "
                         "rerun the same sweep command: finished runs are skipped")


def _raise_interrupt(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up below must not be cut short
    raise KeyboardInterrupt


def _supervise(todo: list[dict], running: dict, failed: list, runs_dir: Path,
               parallel: int) -> None:
    while todo or running:
        while todo and len(running) < parallel:
            settings = todo.pop(0)
            log_path = runs_dir / "logs" / f"{settings['run_name']}.log"
            print(f"start {settings['run_name']} (log: {log_path})", flush=True)
            running[settings["run_name"]] = (start_run(settings, log_path), time.time())
        time.sleep(1.0)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            seconds = time.time() - started
            print(f"done  {name}: exit {proc.returncode}, {seconds:.0f} s", flush=True)
            if proc.returncode != 0:
                failed.append(name)
            else:
                (runs_dir / name / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")


def prepare_data_once(settings: dict) -> None:
    """Generate the phantom and fill the cache before runs start, so parallel runs only read."""
    import factory  # heavy imports only when runs are actually started
    import runtime

    runtime.setup_logging(None)
    factory.prepare_data(config.make_config(settings))


# ---- collection ---------------------------------------------------------------------------
COLUMNS = ["config", "seed", "status", "model", "w_bce", "w_tversky", "w_dice", "tversky_weighting",
           "tversky_fp_weight", "tversky_fn_weight", "tversky_gamma", "dice_log",
           "bce_pos_weight", "tune_threshold", "loss_reduction", "fg_fraction", "context_slices",
           "steps", "params_m", "gflop_per_slice",
           "test_dice", "test_dice_ci_low", "test_dice_ci_high", "fpv_ml_tumor_free", "fnv_ml",
           "hd95_mm", "lesion_recall", "lesion_precision", "lesion_f1", "n_test", "n_test_tumor",
           "best_val_pseudo_dice", "train_seconds", "machine"]


def _nan_for_none(value):
    """summary.json stores NaN (a mean over no study) as null."""
    if isinstance(value, dict):
        return {key: _nan_for_none(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return math.nan if value is None else value


def run_status(run_dir: Path) -> str | None:
    """"ok" (evaluated), "diverged" (stopped by repeated non-finite losses), or None (not run
    or still unfinished: left out of the leaderboard)."""
    if (run_dir / "eval" / "summary.json").exists():
        return "ok"
    log = run_dir / "train.log"
    if log.exists():  # stopped by training's non-finite guard: more skips in a row than allowed
        in_a_row = [int(n) for n in re.findall(r"step skipped \((\d+) in a row", log.read_text())]
        if in_a_row and max(in_a_row) > config.load_config(run_dir).max_nonfinite:
            return "diverged"
    return None


@functools.lru_cache(maxsize=None)
def model_cost(model: str, in_channels: int, img_size: int) -> tuple[float, float]:
    """(million parameters, forward GFLOP per slice) of a configuration's model, built fresh
    (torch's FlopCounterMode: a count of the operations, independent of the machine's load)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import models

    net = models.build_model(model, in_channels=in_channels, num_classes=1, img_size=img_size)
    net.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, in_channels, img_size, img_size))
    params = sum(p.numel() for p in net.parameters())
    return round(params / 1e6, 3), round(counter.get_total_flops() / 1e9, 3)


def _cost_columns(cfg) -> dict:
    params, gflop = model_cost(cfg.model, cfg.in_channels, cfg.img_size)
    return {"params_m": params, "gflop_per_slice": gflop}


def machine(run_dir: Path) -> str:
    """Where a run ran, from the environment facts in its config.json."""
    env = json.loads((run_dir / "config.json").read_text()).get("environment", {})
    gpus = env.get("gpus") or []
    return f"{gpus[0]}, torch {env.get('torch')}" if gpus else \
        f"CPU ({env.get('cpu_count')} cores), torch {env.get('torch')}"


def diverged_row(name: str, seed: int, run_dir: Path) -> dict:
    """A leaderboard row for a run that training stopped: metrics NaN, the failure visible."""
    cfg = config.load_config(run_dir)
    row = {key: getattr(cfg, key) for key in COLUMNS if hasattr(cfg, key)}
    row.update({key: math.nan for key in COLUMNS if key not in row})
    row.update(config=name, seed=seed, status="diverged", machine=machine(run_dir),
               **_cost_columns(cfg))
    return row


def read_run(name: str, seed: int, run_dir: Path) -> dict:
    """One leaderboard row from an evaluated run directory (nothing typed by hand)."""
    cfg = config.load_config(run_dir)
    summary = _nan_for_none(json.loads((run_dir / "eval" / "summary.json").read_text()))
    cohort = summary.get("raw", summary)  # the un-post-processed figures are the headline
    metrics, lesions = cohort["metrics"], cohort["lesions"]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [e["val_pseudo_dice"] for e in epochs if e.get("val_pseudo_dice") is not None]
    row = {key: getattr(cfg, key) for key in COLUMNS if hasattr(cfg, key)}
    ci = metrics["dice"].get("ci95") or [math.nan, math.nan]
    row.update(config=name, seed=seed, steps=epochs[-1]["step"] if epochs else 0,
               test_dice=metrics["dice"]["mean"], test_dice_ci_low=ci[0], test_dice_ci_high=ci[1],
               fpv_ml_tumor_free=metrics["fpv_ml_tumor_free"]["mean"],
               fnv_ml=metrics["fnv_ml"]["mean"], hd95_mm=metrics["hd95_mm"]["mean"],
               lesion_recall=lesions["recall"], lesion_precision=lesions["precision"],
               lesion_f1=lesions["f1"], n_test=cohort["n_studies"], n_test_tumor=cohort["n_tumor"],
               best_val_pseudo_dice=max(val) if val else math.nan, status="ok",
               machine=machine(run_dir), **_cost_columns(cfg),
               train_seconds=round(sum(e.get("seconds", 0.0) for e in epochs), 1))
    return row


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean ± standard deviation over seeds, per configuration and machine, best test Dice first."""
    by_config: dict[tuple[str, str], list[dict]] = {}
    for row in rows:  # a bf16 GPU run and a float32 CPU run of one seed are different runs
        by_config.setdefault((row["config"], row.get("machine", "")), []).append(row)
    table = []
    for (name, where), runs in by_config.items():
        diverged = sum(r.get("status") == "diverged" for r in runs)
        entry = {"config": name, "machine": where, "model": runs[0]["model"],
                 "params_m": runs[0].get("params_m", math.nan),
                 "gflop_per_slice": runs[0].get("gflop_per_slice", math.nan),
                 "seeds": len(runs), "diverged": diverged}
        for key in ("test_dice", "fpv_ml_tumor_free", "fnv_ml", "hd95_mm", "lesion_f1"):
            values = [r[key] for r in runs if not math.isnan(r[key])]
            entry[key] = statistics.fmean(values) if values else math.nan
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else math.nan
        entry["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
        table.append(entry)
    return sorted(table, key=lambda e: -e["test_dice"] if not math.isnan(e["test_dice"]) else 1)


def paired_differences(rows: list[dict], reference: str = "published_combined") -> list[dict]:
    """Per configuration with several seeds: mean and SD of (config - reference) on the same seed
    and the same machine."""
    ref = {(r.get("machine", ""), r["seed"]): r for r in rows if r["config"] == reference}
    out = []
    for name, where in sorted({(r["config"], r.get("machine", "")) for r in rows}):
        if name == reference:
            continue
        pairs = [(r, ref[where, r["seed"]]) for r in rows if r["config"] == name
                 and r.get("machine", "") == where and (where, r["seed"]) in ref]
        if len(pairs) < 2:
            continue
        entry = {"config": name, "machine": where, "vs": reference, "pairs": len(pairs)}
        for key in ("test_dice", "fpv_ml_tumor_free", "fnv_ml", "lesion_f1"):
            diffs = [a[key] - b[key] for a, b in pairs if not math.isnan(a[key] - b[key])]
            entry[key] = statistics.fmean(diffs) if diffs else math.nan
            entry[key + "_sd"] = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
            # "no difference" unless the mean paired difference exceeds its seed-to-seed spread
            entry[key + "_verdict"] = ("no difference" if not diffs or len(diffs) < 2
                                       or abs(entry[key]) <= entry[key + "_sd"] else
                                       ("higher" if entry[key] > 0 else "lower"))
        out.append(entry)
    return out


def short_machine(machine: str) -> str:
    """"NVIDIA H200, torch 2.11.0" -> "NVIDIA H200": the plot's label and the table's column."""
    return machine.split(", torch")[0]


def write_results(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = aggregate(rows)
    several = len({e["machine"] for e in table}) > 1  # then every row says where it ran
    where = lambda e: f" {short_machine(e['machine'])} |" if several else ""  # noqa: E731
    lines = [f"# {title}", "", "| # | configuration | model (M params, GFLOP/slice) |"
             + (" machine |" if several else "") + " seeds | test Dice | FPV ml (tumour-free) "
             "| FNV ml | HD95 mm | lesion F1 | train s |", "|---" * (11 if several else 10) + "|"]
    for rank, e in enumerate(table, 1):
        pm = lambda k: _fmt(e[k]) + ("" if math.isnan(e[k + "_sd"]) else f" ± {_fmt(e[k + '_sd'])}")  # noqa: E731
        cost = "" if math.isnan(e["params_m"]) else \
            f" ({e['params_m']:.1f}, {e['gflop_per_slice']:.2f})"
        head = f"| {rank} | {e['config']} | {e['model']}{cost} |{where(e)} {e['seeds']} |"
        if e["diverged"]:
            lines.append(f"{head} diverged in {e['diverged']} of {e['seeds']} runs (non-finite "
                         "loss) | | | | | |")
            continue
        lines.append(f"{head} {pm('test_dice')} | {pm('fpv_ml_tumor_free')} | {pm('fnv_ml')} "
                     f"| {pm('hd95_mm')} | {pm('lesion_f1')} | {e['train_seconds']:.0f} |")
    diffs = paired_differences(rows)
    if diffs:
        lines += ["", "Paired differences against the published loss (same seed, same split, same "
                  "machine), mean ± SD over seeds; 'no difference' when |mean| <= SD:", "",
                  "| configuration |" + (" machine |" if several else "") + " pairs | Δ test Dice "
                  "| Δ FPV ml (tumour-free) | Δ FNV ml | Δ lesion F1 |",
                  "|---" * (7 if several else 6) + "|"]
        for d in diffs:
            cell = lambda k: f"{_fmt(d[k])} ± {_fmt(d[k + '_sd'])} ({d[k + '_verdict']})"  # noqa: E731
            lines.append(f"| {d['config']} |{where(d)} {d['pairs']} | {cell('test_dice')} | "
                         f"{cell('fpv_ml_tumor_free')} | {cell('fnv_ml')} | {cell('lesion_f1')} |")
    (out / "leaderboard.md").write_text("\n".join(lines) + "\n")
    plot(table, out / "leaderboard.png", title, several)


def plot(table: list[dict], path: Path, title: str, several: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(table) + 1.8), sharey=True)
    names = [e["config"] + (f" [{short_machine(e['machine'])}]" if several else "")
             + (" (diverged)" if e["diverged"] else "") for e in table][::-1]
    for ax, key, label in ((axes[0], "test_dice", "test Dice (tumour studies)"),
                           (axes[1], "fpv_ml_tumor_free", "FPV ml (tumour-free studies)")):
        values = [0.0 if math.isnan(e[key]) else e[key] for e in table][::-1]
        errors = [0.0 if math.isnan(e[key + "_sd"]) else e[key + "_sd"] for e in table][::-1]
        ax.barh(names, values, xerr=errors, color="tab:blue" if key == "test_dice" else "tab:red")
        if key == "fpv_ml_tumor_free":  # a flooding baseline (10^4 ml) must not hide 0.3 vs 9 ml
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)  # volumes are >= 0; a wide SD bar would otherwise pull the axis
            label += ", symmetric log scale"
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EVIDENCE = ("config.json", "split.json", "metrics.jsonl", "train.log", "wall_seconds.txt",
            "eval/summary.json", "eval/per_case.csv")


def export_evidence(run_dir: Path, dest: Path) -> None:
    """The small files behind a leaderboard row (no weights, no predictions), for committing."""
    if dest.resolve() == run_dir.resolve():
        return
    for name in EVIDENCE:
        if (run_dir / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, dest / name)


def collect(plan: list[tuple[str, int, dict]], roots: list[Path]) -> list[tuple[dict, Path]]:
    """(row, run directory) for every finished or diverged run of the plan, in each root."""
    found = []
    for config_name, seed, _ in plan:
        for root in roots:
            run_dir = root / f"{config_name}-s{seed}"
            status = run_status(run_dir)
            if status is not None:
                read = diverged_row if status == "diverged" else read_run
                found.append((read(config_name, seed, run_dir), run_dir))
    return found


README_BLOCK = re.compile(r"(<!-- from (\S+) -->\n)(.*?)(<!-- end -->)", re.S)


def sync_readme(readme: Path, check: bool = False) -> list[str]:
    """Put the current content of each committed results file into the README block that names
    it (`<!-- from results/leaderboard.md -->` ... `<!-- end -->`), so that the README's tables
    are the sweep's files, never numbers typed by hand. Returns the blocks that were (check:
    would be) changed."""
    text = readme.read_text()
    changed = []

    def fill(match: re.Match) -> str:
        body = (readme.parent / match.group(2)).read_text()
        body = "\n".join(line for line in body.splitlines() if not line.startswith("# ")).strip()
        if match.group(3).strip() != body:
            changed.append(match.group(2))
        return f"{match.group(1)}{body}\n{match.group(4)}"

    new = README_BLOCK.sub(fill, text)
    if changed and not check:
        readme.write_text(new)
    return changed


def main(argv: list[str]) -> None:
    options = dict(grid="study", budget="cpu", seeds=None, runs_dir="runs/study",
                   results_dir="results", out="", export="", collect_only=False, dry_run=False,
                   parallel=1, only="")
    extra = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            return
        if arg == "--sync_readme":
            changed = sync_readme(Path(__file__).parent / "README.md")
            print(f"README.md: updated {changed}" if changed else "README.md: up to date")
            return
        key, _, raw = arg.lstrip("-").partition("=")
        if key in options:
            options[key] = raw if raw else True
        else:  # any other --key=value is a config override applied to every run
            extra[key] = config.parse_value(raw)
    if options["grid"] not in GRIDS or options["budget"] not in BUDGETS:
        raise config.ConfigError(f"--grid is one of {sorted(GRIDS)}, --budget one of "
                                 f"{sorted(BUDGETS)}")
    seeds = tuple(int(s) for s in str(options["seeds"]).split(",")) if options["seeds"] else None
    name = f"{options['grid']}-{options['budget']}"
    roots = [Path(d) / name for d in str(options["runs_dir"]).split(",") if d]
    only = tuple(n for n in str(options["only"]).split(",") if n) if options["only"] else ()
    plan = run_plan(options["grid"], seeds, only)
    if options["dry_run"]:
        for config_name, seed, overrides in plan:
            print(config_name, seed, overrides)
        return
    if options["export"] and len(roots) != 1:  # the same run name on two machines would collide
        raise config.ConfigError("--export copies the runs of one --runs_dir; export each "
                                 "machine's runs separately")
    if not options["collect_only"]:
        if len(roots) != 1:
            raise config.ConfigError("training needs one --runs_dir (several are for "
                                     "--collect_only)")
        run_all(plan, options["budget"], roots[0], extra, int(options["parallel"]))
    found = collect(plan, roots)
    rows = [row for row, _ in found]
    machines = sorted({row["machine"] for row in rows})
    out = Path(options["out"]) if options["out"] else Path(options["results_dir"]) / name
    write_results(rows, out, f"{options['grid']} grid, budget {options['budget']}: {len(rows)} "
                  f"runs on {' / '.join(machines) or 'no machine yet'}")
    if options["export"]:
        for _, run_dir in found:
            export_evidence(run_dir, Path(options["export"]) / name / run_dir.name)
        print(f"evidence of {len(found)} runs: {Path(options['export']) / name}/")
    print(f"results: {out}/leaderboard.md")


if __name__ == "__main__":
    import runtime

    with runtime.exit_on_user_error():
        main(sys.argv[1:])
