"""The study: a named grid of configurations run through the normal `main.py` path, each seed in
its own run directory, resumable (finished runs are skipped), collected into a leaderboard.

    python sweep.py --grid=study --budget=cpu              # >= 23 configurations (hours on 2 CPU cores)
    python sweep.py --grid=headline --budget=cpu           # BCE vs published vs corrected, 3 seeds
    python sweep.py --grid=levers --budget=quick           # issue #13: one lever at a time
    python sweep.py --grid=headline_long --budget=long     # the headline near convergence, 3 seeds
    python sweep.py --grid=data_size --budget=quick --plot_vs=n_train # Dice vs training studies
    python sweep.py --grid=study --budget=gpu              # the same grid, longer training, on a GPU
    python sweep.py --grid=study --budget=cpu --collect_only   # rebuild results/ from finished runs
    python sweep.py --grid=study --budget=cpu --parallel=4     # 4 runs at a time (a GPU machine)
    python sweep.py --grid=study --budget=cpu --only=unet_resnet34,fpn_resnet34   # a subset
    python sweep.py --grid=study --budget=cpu --export=results/mine/runs   # + the runs' evidence
    python sweep.py --grid=study --budget=cpu --collect_only --out=results \
        --runs_dir=results/h200/runs,results/cpu2core/runs      # one leaderboard, two machines

Options (any other --key=value is a config.py setting applied to every run):
    --grid=study|headline|levers|headline_long|data_size  --budget=cpu|gpu|quick|long|smoke
    --seeds=0,1,2  --only=NAME,NAME
    --runs_dir=DIR[,DIR]   run directories go to DIR/<grid>-<budget>/<config>-s<seed>/; with several
                           DIRs (--collect_only) a run found in each gives one row per machine
    --results_dir=DIR      leaderboard goes to DIR/<grid>-<budget>/ (or exactly --out=DIR)
    --export=DIR           copy each collected run's evidence (config, split, metrics, log,
                           eval summary and per-case CSV; no weights) to DIR/<grid>-<budget>/
    --plot_vs=COLUMN       also test_dice_vs_COLUMN.png: test Dice against a numeric
                           leaderboard.csv column (n_train, phantom_cases), one line per machine
    --parallel=N  --collect_only  --dry_run
    --sync_readme          copy the results files into the README blocks that name them

Writes `leaderboard.{csv,md,png}`: one CSV row per configuration, seed and machine, with the
commit each run trained at; the table gives mean ± SD over seeds per configuration and machine,
and paired differences against the published loss (same seed, same machine). A run whose
settings differ from its configuration's definition here gets a name that says how
(`bce_posweight [tune_threshold=False]`), so runs of different settings are never averaged or
paired together (NEUTRAL_SETTINGS lists what does not count). `paired_tests.{md,csv}`: for each
(configuration, reference) of COMPARISONS, a paired test over the test studies (bootstrap CI of
the mean difference, Wilcoxon signed-rank): Dice on tumour studies, FPV on tumour-free ones.
Rules followed (docs/study.md): every configuration of
a budget trains for the same number of optimiser steps with the same batch and schedule; the data
split is fixed (`split_seed`), seeds change the initialisation and the sampling; test studies are
never used to choose anything (checkpoints are chosen on validation studies).
"""

from __future__ import annotations

import csv
import functools
import hashlib
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

# Issue #13: one lever at a time on top of the corrected combined loss (the reference, in the
# grid so that every lever is paired with it on the same seeds and machine). `tune_threshold`
# and `postprocess` change only the evaluation: they train the reference again (same seed),
# which `python test.py --run_dir=<reference run> --suv_floor=...` would avoid.
LEVER_SUV_FLOOR = 2.0  # postprocess: SUV below which predicted voxels are dropped (to be set)
AUX_ORGANS = dict(aux_target="organs", w_aux=1.0, n_organ_classes=16)
AUX_UPTAKE = dict(aux_target="uptake", w_aux=1.0, uptake_suv=2.5)
LEVERS = {
    "corrected_combined": CORRECTED,
    "aux_organs": {**CORRECTED, **AUX_ORGANS},
    "aux_uptake": {**CORRECTED, **AUX_UPTAKE},
    "more_studies_150": {**CORRECTED, "phantom_cases": 160},  # 150 training studies, not 40
    "misalign": {**CORRECTED, "p_misalign": 0.1},
    "context_2.5d": {**CORRECTED, "context_slices": 1},
    "tune_threshold": {**CORRECTED, "tune_threshold": True},
    "postprocess": {**CORRECTED, "suv_floor": LEVER_SUV_FLOOR, "min_component_ml": 0.0},
    # threshold, SUV floor, minimum volume and minimum SUVmax chosen together on validation
    "tune_postprocess": {**CORRECTED, "tune_postprocess": True},
    "ema": {**CORRECTED, "ema_decay": 0.995},  # validation and test on the moving average
    # a soft-tissue CT window and SUV scaled over [0, 10]: more input contrast where tumour
    # and physiological uptake differ
    "input_window": {**CORRECTED, "ct_window": (-200.0, 300.0), "suv_max": 10.0},
}

# the headline comparisons near convergence (budget `long`): published vs corrected loss, and
# the corrected loss with vs without the organ head
HEADLINE_LONG = {
    "published_combined": PUBLISHED,
    "corrected_combined": CORRECTED,
    "aux_organs": {**CORRECTED, **AUX_ORGANS},
}

# test Dice against the number of training studies: the same n_val (budget) and the same 50
# test studies (the budgets of these grids take them from a phantom of their own seed), more
# phantom studies for training and validation (phantom_cases - n_val train: 40, 60, 100, 200;
# the split holds whole patients, so the counts are read back from split.json: column n_train)
DATA_SIZE = {f"phantom_{n}": {**CORRECTED, "phantom_cases": n} for n in (50, 70, 110, 210)}

GRIDS = {"study": STUDY, "headline": HEADLINE, "levers": LEVERS, "headline_long": HEADLINE_LONG,
         "data_size": DATA_SIZE}
HEADLINE_SEEDS = (0, 1, 2)
# configurations that get HEADLINE_SEEDS (the others one seed) unless --seeds is given
MULTI_SEED = {"study": set(HEADLINE), "headline": set(HEADLINE),
              "headline_long": set(HEADLINE_LONG)}

# The paired tests over test studies (paired_tests.{md,csv}): (configuration, reference), names
# of the grid; a pair none of whose runs were collected is left out.
COMPARISONS = [
    ("corrected_combined", "published_combined"),
    ("bce_posweight", "published_combined"),
    ("aux_organs", "corrected_combined"),
    *((name, "corrected_combined") for name in LEVERS if name not in
      ("corrected_combined", "aux_organs")),
    ("corrected_combined_2.5d", "corrected_combined"),
    *((name, "corrected_combined") for name, o in STUDY.items() if "model" in o),
]

# ---- budgets: the same work for every configuration of a budget ---------------------------
# the first study (results/*/study-cpu): 100 phantom studies split 40 / 10 / 50
_STUDY_DATA = dict(phantom_cases=100, phantom_test_seed=None, phantom_size="demo", n_val=10,
                   n_test=50, split_seed=0, save_overlays=False)
# the issue-13 grids: 50 phantom studies of seed 0 for training (40) and validation (10), and a
# fixed test set of 50 studies of a phantom of seed 1, which no run sees in any form and which
# stays the same whatever phantom_cases a configuration uses (nested comparisons)
_NESTED_DATA = dict(phantom_cases=50, phantom_test_seed=1, phantom_size="demo", n_val=10,
                    n_test=50, split_seed=0, save_overlays=False)
# the sweep's runs start from the plain model: none of the cpu preset's recipe (uptake head,
# moving average, tuned post-processing, its lr 1.5e-3, flip TTA, hard negatives) unless a
# configuration asks for it; lr 3e-3, validation after every epoch, no TTA and uniform
# non-tumour slices are what every grid was defined and run with
_PLAIN = dict(aux_target="none", ema_decay=0.0, tune_postprocess=False, lr=3e-3, val_every=1,
              tta=False, hot_fraction=0.0)
BUDGETS = {
    # ~400 optimiser steps of batch 16 per run on 2 CPU cores
    "cpu": dict(preset="cpu", epochs=8, steps_per_epoch=50, batch_size=16, warmup_steps=30,
                **_STUDY_DATA, **_PLAIN),
    # the same grid with 3x the steps, for a GPU (add --parallel=4 --num_workers=3 there)
    "gpu": dict(preset="cpu", epochs=12, steps_per_epoch=100, batch_size=16, warmup_steps=60,
                **_STUDY_DATA, **_PLAIN),
    # near convergence: 4x the `cpu` steps (1600), the weights of every epoch kept for a
    # learning curve (bench/learning_curve.py); the lead sets the final numbers
    "long": dict(preset="cpu", epochs=16, steps_per_epoch=100, batch_size=16, warmup_steps=60,
                 keep_epoch_checkpoints=True, **_NESTED_DATA, **_PLAIN),
    # the `cpu` budget's 400 steps on the nested data: screening the levers
    "quick": dict(preset="cpu", epochs=8, steps_per_epoch=50, batch_size=16, warmup_steps=30,
                  **_NESTED_DATA, **_PLAIN),
    # machinery check (tests): seconds per run
    "smoke": dict(preset="tiny", epochs=1, steps_per_epoch=2, batch_size=2, phantom_cases=8,
                  n_val=2, n_test=2, n_bootstrap=20, save_overlays=False),
}


# the budgets each grid is run with: the first study's grids on its 100 studies split 40/10/50,
# the issue-13 grids on the nested data (a grid of phantom_cases < 61 cannot also split off the
# 50 test studies)
GRID_BUDGETS = {"study": ("cpu", "gpu", "smoke"), "headline": ("cpu", "gpu", "smoke"),
                "levers": ("quick", "long", "smoke"), "headline_long": ("long", "quick", "smoke"),
                "data_size": ("quick", "long", "smoke")}


def run_plan(grid: str, seeds: tuple[int, ...] | None,
             only: tuple[str, ...] = ()) -> list[tuple[str, int, dict]]:
    """(configuration, seed, overrides) for every run: the grid's MULTI_SEED configurations get
    HEADLINE_SEEDS, the others seed 0, `seeds` all of them. `only` keeps the named
    configurations, in that order."""
    plan = []
    names = only or tuple(GRIDS[grid])
    unknown = set(names) - set(GRIDS[grid])
    if unknown:
        raise config.ConfigError(f"--only: {sorted(unknown)} not in grid {grid!r}")
    for name in names:
        overrides = GRIDS[grid][name]
        run_seeds = seeds or (HEADLINE_SEEDS if name in MULTI_SEED.get(grid, ()) else (0,))
        plan += [(name, seed, overrides) for seed in run_seeds]
    return plan


def _run_values(name: str, seed: int, overrides: dict, budget: str, runs_dir: Path,
                extra: dict) -> dict:
    return {**BUDGETS[budget], **overrides, **extra, "seed": seed, "out_dir": str(runs_dir),
            "run_name": f"{name}-s{seed}"}


def run_settings(name: str, seed: int, overrides: dict, budget: str, runs_dir: Path,
                 extra: dict) -> dict:
    settings = _run_values(name, seed, overrides, budget, runs_dir, extra)
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
# `config` is the row's name: the grid's name (`grid_name`), with the settings in which the run
# differs from the grid's definition when it does (label_variants); `commit` the code it
# trained at, `eval_commit` the code that evaluated it; `postprocessed`: the test figures are
# of the post-processed masks (the run's config post-processes), else of the raw ones.
COLUMNS = ["config", "seed", "status", "model", "w_bce", "w_tversky", "w_dice", "tversky_weighting",
           "tversky_fp_weight", "tversky_fn_weight", "tversky_gamma", "dice_log",
           "bce_pos_weight", "tune_threshold", "loss_reduction", "fg_fraction", "context_slices",
           "aux_target", "p_misalign", "suv_floor", "postprocessed", "phantom_cases", "n_train",
           "steps", "params_m", "gflop_per_slice",
           "test_dice", "test_dice_ci_low", "test_dice_ci_high", "fpv_ml_tumor_free", "fnv_ml",
           "hd95_mm", "lesion_recall", "lesion_precision", "lesion_f1", "n_test", "n_test_tumor",
           "best_val_pseudo_dice", "train_seconds", "machine", "grid_name", "settings_id",
           "commit", "eval_commit"]

# Settings that do not change what a run computes, left out of its settings fingerprint: where
# files go and what the run is called; the seed (the runs of one configuration differ in it by
# design, and are aggregated over it); what it runs on and how fast (device, loader workers,
# inference batch, torch.compile, channels_last, activation checkpointing, deterministic
# kernels: the same arithmetic up to floating-point rounding, and the machine is a column of
# its own); what is written beside the metrics (overlays, the weights of every epoch); the
# bootstrap resamples of the confidence intervals (the means do not depend on them); and the
# preset, which only fills in values that are compared one by one.
NEUTRAL_SETTINGS = ("seed", "out_dir", "run_name", "resume", "device", "num_workers", "cache_dir",
                    "eval_batch_size", "compile", "channels_last", "grad_checkpointing",
                    "deterministic", "save_overlays", "keep_epoch_checkpoints", "n_bootstrap",
                    "preset")
# settings that change nothing unless another one has one of the given values
INERT_UNLESS = {"uptake_suv": ("aux_target", ("uptake",)),
                "n_organ_classes": ("aux_target", ("organs",)),
                "w_aux": ("aux_target", ("organs", "uptake")),
                "pp_thresholds": ("tune_postprocess", (True,)),
                "pp_objective": ("tune_postprocess", (True,)),
                "pp_max_fpv_ml": ("pp_objective", ("mean_dice_fpv",))}
# settings added after runs were recorded, left out at the value that keeps the earlier
# behaviour, so the fingerprints (and settings_ids) of the recorded runs stay what they were
LATER_SETTINGS = {"average_from": 0.0, "pp_objective": "pooled_dice", "pp_max_fpv_ml": 1.0}
# unused when the run trained on a data_dir (without one, data_dir is None in every run)
PHANTOM_SETTINGS = ("phantom_cases", "phantom_size", "phantom_seed")


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


def json_values(values: dict) -> dict:
    """Settings as config.json holds them (tuples -> lists), so that two records compare equal."""
    return json.loads(json.dumps(values, default=str))


def settings_fingerprint(values: dict) -> dict:
    """What a run computes: its resolved config (config.json "config" read by
    config.load_config, so a key an older run lacks has today's default) without
    NEUTRAL_SETTINGS (and PHANTOM_SETTINGS when it trained on a data_dir, the INERT_UNLESS
    settings their switch leaves unused, the LATER_SETTINGS at their default), as JSON values."""
    values = json_values(values)
    drop = set(NEUTRAL_SETTINGS) | (set(PHANTOM_SETTINGS) if values.get("data_dir") else set())
    drop |= {key for key, (setting, active) in INERT_UNLESS.items()
             if values.get(setting) not in active}
    drop |= {key for key, default in LATER_SETTINGS.items() if values.get(key, default) == default}
    return {key: value for key, value in sorted(values.items()) if key not in drop}


def settings_id(fingerprint: dict) -> str:
    """8 hex digits naming a fingerprint (the CSV's `settings_id`: equal ids, equal settings)."""
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]


def _setting(value) -> str:
    return f"({', '.join(map(str, value))})" if isinstance(value, list) else str(value)


def label_variants(rows: list[dict]) -> None:
    """Name every row (`config`) so that runs of different settings never share a name.

    A run whose settings fingerprint is its grid configuration's definition today (`_definition`,
    the settings sweep.py would start it with) keeps the grid's name (`grid_name`); any other
    gets the keys in which it differs, with its values: `bce_posweight [tune_threshold=False]`.
    Two fingerprints differ in some key, so their names differ. Rows without a definition are
    named by the keys in which the fingerprints of their name differ from each other."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["grid_name"], []).append(row)
    for name, group in by_name.items():
        prints = [row["_fingerprint"] for row in group]
        for row in group:
            fp, definition = row["_fingerprint"], row.get("_definition")
            keys = sorted({key for p in [*prints, definition or {}] for key in p})
            if definition is not None:
                differ = [k for k in keys if fp.get(k) != definition.get(k)]
            else:
                differ = [k for k in keys if len({json.dumps(p.get(k)) for p in prints}) > 1]
            row["config"] = name + (" [" + ", ".join(f"{k}={_setting(fp.get(k))}" for k in differ)
                                    + "]" if differ else "")


def computed_amp(amp, environment: dict):
    """`amp` as the run computed it where the record alone would hide it: `amp="auto"` was
    float32 on every CPU until runtime.resolve_amp took bf16 on a CPU with bf16 in hardware
    (config.json environment.cpu_native_bf16 since), so a CPU run of "auto" with that record
    is "bf16" and never shares a row with the float32 runs the grids were defined with. Any
    other value (GPU runs, explicit settings, older CPU runs) stays as recorded."""
    if amp == "auto" and not environment.get("gpus") and environment.get("cpu_native_bf16"):
        return "bf16"
    return amp


def run_facts(run_dir: Path, cfg) -> dict:
    """Columns from the run's files beside its metrics: `commit` (config.json
    environment.git_commit as recorded, "+dirty" when the code had uncommitted changes,
    "unknown" when the run predates the record), `eval_commit` (eval/summary.json, the same
    way), `n_train` (its training studies, split.json) and the settings fingerprint."""
    payload = json.loads((run_dir / "config.json").read_text())
    summary = run_dir / "eval" / "summary.json"
    evaluated = json.loads(summary.read_text()).get("environment", {}) if summary.exists() else {}
    split = run_dir / "split.json"
    environment = payload.get("environment", {})
    fingerprint = settings_fingerprint({**cfg.to_dict(),
                                        "amp": computed_amp(cfg.amp, environment)})
    return {"commit": payload.get("environment", {}).get("git_commit") or "unknown",
            "eval_commit": evaluated.get("git_commit") or "unknown",
            "n_train": len(json.loads(split.read_text())["train"]) if split.exists() else math.nan,
            "settings_id": settings_id(fingerprint), "_fingerprint": fingerprint}


def _post_processes(cfg) -> bool:
    return cfg.suv_floor > 0 or cfg.min_component_ml > 0


def diverged_row(name: str, seed: int, run_dir: Path) -> dict:
    """A leaderboard row for a run that training stopped: metrics NaN, the failure visible."""
    cfg = config.load_config(run_dir)
    row = {key: getattr(cfg, key) for key in COLUMNS if hasattr(cfg, key)}
    row.update({key: math.nan for key in COLUMNS if key not in row})
    row.update(config=name, grid_name=name, seed=seed, status="diverged",
               machine=machine(run_dir), postprocessed=_post_processes(cfg),
               **_cost_columns(cfg), **run_facts(run_dir, cfg))
    return row


def read_run(name: str, seed: int, run_dir: Path) -> dict:
    """One leaderboard row from an evaluated run directory (nothing typed by hand)."""
    cfg = config.load_config(run_dir)
    summary = _nan_for_none(json.loads((run_dir / "eval" / "summary.json").read_text()))
    # the masks the configuration delivers: post-processed when its config post-processes
    # (test.py then also scores the raw ones, summary "postprocessed" beside them)
    post = _post_processes(cfg) and "postprocessed" in summary
    cohort = summary["postprocessed"] if post else summary
    metrics, lesions = cohort["metrics"], cohort["lesions"]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [e["val_pseudo_dice"] for e in epochs if e.get("val_pseudo_dice") is not None]
    row = {key: getattr(cfg, key) for key in COLUMNS if hasattr(cfg, key)}
    ci = metrics["dice"].get("ci95") or [math.nan, math.nan]
    row.update(config=name, grid_name=name, seed=seed, postprocessed=post,
               steps=epochs[-1]["step"] if epochs else 0,
               test_dice=metrics["dice"]["mean"], test_dice_ci_low=ci[0], test_dice_ci_high=ci[1],
               fpv_ml_tumor_free=metrics["fpv_ml_tumor_free"]["mean"],
               fnv_ml=metrics["fnv_ml"]["mean"], hd95_mm=metrics["hd95_mm"]["mean"],
               lesion_recall=lesions["recall"], lesion_precision=lesions["precision"],
               lesion_f1=lesions["f1"], n_test=cohort["n_studies"], n_test_tumor=cohort["n_tumor"],
               best_val_pseudo_dice=max(val) if val else math.nan, status="ok",
               machine=machine(run_dir), **_cost_columns(cfg),
               train_seconds=round(sum(e.get("seconds", 0.0) for e in epochs), 1),
               **run_facts(run_dir, cfg))
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
        by_seed = sorted(runs, key=lambda r: r["seed"])
        entry = {"config": name, "machine": where, "model": runs[0]["model"],
                 "params_m": runs[0].get("params_m", math.nan),
                 "gflop_per_slice": runs[0].get("gflop_per_slice", math.nan),
                 "seeds": len(runs), "diverged": diverged,
                 "commits": list(dict.fromkeys(r.get("commit", "unknown") for r in by_seed))}
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


def short_commit(commit: str) -> str:
    """"4bf24f8c3c...+dirty" -> "4bf24f8*" (uncommitted changes), "unknown" as it is."""
    if commit == "unknown":
        return commit
    return commit.split("+")[0][:7] + ("*" if commit.endswith("+dirty") else "")


def short_machine(machine: str) -> str:
    """"NVIDIA H200, torch 2.11.0" -> "NVIDIA H200": the plot's label and the table's column."""
    return machine.split(", torch")[0]


def write_results(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # not _fingerprint
        writer.writeheader()
        writer.writerows(rows)
    table = aggregate(rows)
    several = len({e["machine"] for e in table}) > 1  # then every row says where it ran
    where = lambda e: f" {short_machine(e['machine'])} |" if several else ""  # noqa: E731
    lines = [f"# {title}", "", "| # | configuration | model (M params, GFLOP/slice) |"
             + (" machine |" if several else "") + " seeds | test Dice | FPV ml (tumour-free) "
             "| FNV ml | HD95 mm | lesion F1 | train s | commit |", "|---" * (12 if several else 11)
             + "|"]
    for rank, e in enumerate(table, 1):
        pm = lambda k: _fmt(e[k]) + ("" if math.isnan(e[k + "_sd"]) else f" ± {_fmt(e[k + '_sd'])}")  # noqa: E731
        cost = "" if math.isnan(e["params_m"]) else \
            f" ({e['params_m']:.1f}, {e['gflop_per_slice']:.2f})"
        head = f"| {rank} | {e['config']} | {e['model']}{cost} |{where(e)} {e['seeds']} |"
        commits = ", ".join(short_commit(c) for c in e.get("commits", ["unknown"]))
        if e["diverged"]:
            lines.append(f"{head} diverged in {e['diverged']} of {e['seeds']} runs (non-finite "
                         f"loss) | | | | | | {commits} |")
            continue
        lines.append(f"{head} {pm('test_dice')} | {pm('fpv_ml_tumor_free')} | {pm('fnv_ml')} "
                     f"| {pm('hd95_mm')} | {pm('lesion_f1')} | {e['train_seconds']:.0f} "
                     f"| {commits} |")
    lines += ["", "commit: the code each run trained at (seed order, once each), `*` with "
              "uncommitted changes, `unknown` for runs that predate its record. A name with "
              "`[key=value]` ran with settings that differ from that configuration in sweep.py "
              "today."]
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


def collect(plan: list[tuple[str, int, dict]], roots: list[Path], budget: str | None = None,
            extra: dict | None = None) -> list[tuple[dict, Path]]:
    """(row, run directory) for every finished or diverged run of the plan, in each root, named
    by label_variants against the settings `budget` + grid + `extra` give today (no budget:
    against each other)."""
    found, definitions = [], {}
    for config_name, seed, overrides in plan:
        if budget is not None and config_name not in definitions:  # the seed is neutral
            definitions[config_name] = settings_fingerprint(config.make_config(_run_values(
                config_name, seed, overrides, budget, roots[0], extra or {})).to_dict())
        definition = definitions.get(config_name)
        for root in roots:
            run_dir = root / f"{config_name}-s{seed}"
            status = run_status(run_dir)
            if status is not None:
                read = diverged_row if status == "diverged" else read_run
                row = read(config_name, seed, run_dir)
                row["_definition"] = definition
                found.append((row, run_dir))
    label_variants([row for row, _ in found])
    return found


# ---- paired tests over the test studies ---------------------------------------------------
# (per_case.csv column, tumour studies?, name in paired_tests.csv, label)
PAIRED_METRICS = (("dice", True, "dice", "Dice"),
                  ("fpv_ml", False, "fpv_ml_tumor_free", "FPV ml"))
PAIRED_COLUMNS = ["config", "reference", "machine", "seeds", "n_seeds", "metric", "n", "n_dropped",
                  "mean_config", "mean_reference", "mean_diff", "ci95_low", "ci95_high",
                  "wilcoxon_p", "zero_method", "n_bootstrap", "verdict", "seeds_same_sign",
                  "refused"]
PAIRED_N_BOOTSTRAP = 10000


class PairingError(ValueError):
    """Two runs that must not be paired (other test studies); the comparison is reported refused."""


def run_test_studies(run_dir: Path) -> list[str]:
    """The run's test studies (split.json), sorted."""
    return sorted(json.loads((run_dir / "split.json").read_text())["test"])


def per_study_values(run_dir: Path, column: str, tumour: bool, postprocessed: bool
                     ) -> dict[str, float]:
    """{case_id: value} of eval/per_case.csv `column` (`pp_<column>` when the run's figures
    are post-processed) over its tumour (or tumour-free) studies; refuses a per_case.csv whose
    studies are not the run's test studies."""
    with open(run_dir / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if sorted(r["case_id"] for r in rows) != run_test_studies(run_dir):
        raise PairingError(f"{run_dir}/eval/per_case.csv does not hold the run's test studies")
    key = f"pp_{column}" if postprocessed else column
    return {r["case_id"]: float(r[key]) for r in rows if (r["has_tumor"] == "True") == tumour}


def _mean_over_seeds(values: list[dict[str, float]]) -> dict[str, float]:
    """Per study: the mean of the finite values over seeds (NaN when none is)."""
    out = {}
    for case in values[0]:
        finite = [v[case] for v in values if math.isfinite(v[case])]
        out[case] = statistics.fmean(finite) if finite else math.nan
    return out


def _seeds_same_sign(a: list[dict[str, float]], b: list[dict[str, float]], mean_diff: float
                     ) -> str:
    """"k/n": in how many of the n seeds the mean difference over studies has the sign of the
    seed-averaged one. The test over studies holds the trained models fixed; a difference that
    one seed's model makes and the others do not is a seed effect, which this shows."""
    agree = 0
    for seed_a, seed_b in zip(a, b):
        diffs = [seed_a[c] - seed_b[c] for c in seed_a if math.isfinite(seed_a[c] - seed_b[c])]
        agree += bool(diffs) and statistics.fmean(diffs) * mean_diff > 0
    return f"{agree}/{len(a)}"


def _verdict(result: dict) -> str:
    """A difference is claimed only when the bootstrap CI excludes 0 and Wilcoxon p < 0.05."""
    ci, p = result["ci95"], result["wilcoxon_p"]
    if ci is None or not p < 0.05 or ci[0] <= 0 <= ci[1]:
        return "no difference"
    return "higher" if result["mean_diff"] > 0 else "lower"


def compare_runs(runs_a: list[tuple[dict, Path]], runs_b: list[tuple[dict, Path]],
                 n_bootstrap: int = PAIRED_N_BOOTSTRAP) -> list[dict]:
    """The paired tests of two configurations from their runs of the same seeds and machine
    (runs_a[i] and runs_b[i]: seed i): per test study the metric averaged over those seeds,
    then metrics.paired_comparison over the studies (a = configuration, b = reference), one
    row per PAIRED_METRICS. Runs whose test studies differ are refused (`refused` says why)."""
    import metrics  # scipy / MedPy: only when paired tests are written

    (row_a, _), (row_b, _) = runs_a[0], runs_b[0]
    base = {"config": row_a["config"], "reference": row_b["config"], "machine": row_a["machine"],
            "seeds": ",".join(str(r["seed"]) for r, _ in runs_a), "n_seeds": len(runs_a)}
    out = []
    for column, tumour, name, _ in PAIRED_METRICS:
        entry = {**base, "metric": name, "verdict": "", "refused": ""}
        try:
            if len({tuple(run_test_studies(d)) for _, d in runs_a + runs_b}) > 1:
                raise PairingError("the runs' split.json test sets differ")
            per_seed_a, per_seed_b = ([per_study_values(d, column, tumour, r["postprocessed"])
                                       for r, d in runs] for runs in (runs_a, runs_b))
        except PairingError as exc:
            out.append({**entry, "refused": str(exc)})
            continue
        a, b = _mean_over_seeds(per_seed_a), _mean_over_seeds(per_seed_b)
        studies = sorted(a)
        result = metrics.paired_comparison([a[c] for c in studies], [b[c] for c in studies],
                                           n_bootstrap=n_bootstrap, seed=0)
        ci = result["ci95"] or [math.nan, math.nan]
        entry.update(n=result["n"], n_dropped=result["n_dropped"], mean_config=result["mean_a"],
                     mean_reference=result["mean_b"], mean_diff=result["mean_diff"],
                     ci95_low=ci[0], ci95_high=ci[1], wilcoxon_p=result["wilcoxon_p"],
                     zero_method=result["zero_method"], n_bootstrap=n_bootstrap,
                     verdict=_verdict(result),
                     seeds_same_sign=_seeds_same_sign(per_seed_a, per_seed_b, result["mean_diff"]))
        out.append(entry)
    return out


def paired_tests(found: list[tuple[dict, Path]], comparisons=COMPARISONS,
                 n_bootstrap: int = PAIRED_N_BOOTSTRAP) -> list[dict]:
    """compare_runs for every (configuration, reference) of `comparisons` (grid names), for
    each variant of each (label_variants: one settings fingerprint) on each machine, over the
    seeds both have there (evaluated runs only)."""
    runs: dict[tuple[str, str, str], dict[int, tuple[dict, Path]]] = {}
    for row, run_dir in found:
        if row["status"] == "ok":
            runs.setdefault((row["grid_name"], row["config"], row["machine"]), {})[row["seed"]] = \
                (row, run_dir)
    out = []
    for name, reference in comparisons:
        variants = [(key, seeds) for key, seeds in sorted(runs.items()) if key[0] == name]
        references = [(key, seeds) for key, seeds in sorted(runs.items()) if key[0] == reference]
        for (_, _, where), seeds_a in variants:
            for (_, _, where_b), seeds_b in references:
                shared = sorted(set(seeds_a) & set(seeds_b))
                if where == where_b and shared:
                    out += compare_runs([seeds_a[s] for s in shared], [seeds_b[s] for s in shared],
                                        n_bootstrap)
    return out


def _signed(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:+.3f}"


def _p(value: float) -> str:
    return "nan" if math.isnan(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def write_paired_tests(tests: list[dict], out: Path, title: str) -> None:
    """paired_tests.csv (PAIRED_COLUMNS, one row per comparison, machine and metric) and
    paired_tests.md (one row per comparison and machine)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "paired_tests.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PAIRED_COLUMNS)
        writer.writeheader()
        writer.writerows({key: t.get(key, "") for key in PAIRED_COLUMNS} for t in tests)
    several = len({t["machine"] for t in tests}) > 1
    lines = [f"# Paired tests over the test studies: {title}", "",
             "Per comparison: the runs of the two configurations with the same seed on the same "
             "machine (same test studies, else refused); per test study the metric is averaged "
             "over those seeds, then compared over the studies: Dice over the tumour studies, "
             "FPV over the tumour-free ones. Δ = configuration − reference, its 95 % CI a "
             f"percentile bootstrap over studies ({PAIRED_N_BOOTSTRAP} resamples, seed 0), p the "
             "two-sided Wilcoxon signed-rank test (zero differences ranked, Pratt). A difference "
             "is claimed (higher / lower) only when the CI excludes 0 and p < 0.05; no correction "
             "for the number of comparisons. The test holds the trained models fixed: it measures "
             "the sampling of test studies, not of training seeds. `(k/n seeds)` beside a claim: "
             "in how many of the seeds the difference has that sign; a claim that not every "
             "seed shares is a seed effect as much as a configuration effect (the leaderboard's "
             "paired differences over seeds).", ""]
    if not tests:
        lines.append("No comparison of sweep.COMPARISONS has runs here.")
        (out / "paired_tests.md").write_text("\n".join(lines) + "\n")
        return
    lines += ["| configuration | reference |" + (" machine |" if several else "") + " seeds |"
              + "".join(f" {label} (n) | Δ {label} [95 % CI] | p |"
                        for *_, label in PAIRED_METRICS),
              "|---" * (3 + several + 3 * len(PAIRED_METRICS)) + "|"]
    by_pair: dict[tuple[str, str, str], dict[str, dict]] = {}
    for t in tests:
        by_pair.setdefault((t["config"], t["reference"], t["machine"]), {})[t["metric"]] = t
    for (name, reference, where), pair in by_pair.items():
        cells = []
        for _, _, metric, _ in PAIRED_METRICS:
            t = pair[metric]
            if t["refused"]:
                cells += [f"refused: {t['refused']}", "", ""]
                continue
            word = "" if t["verdict"] == "no difference" else f" **{t['verdict']}**"
            if word and t["n_seeds"] > 1:
                word += f" ({t['seeds_same_sign']} seeds)"
            cells += [f"{_fmt(t['mean_config'])} vs {_fmt(t['mean_reference'])} ({t['n']})",
                      f"{_signed(t['mean_diff'])} [{_signed(t['ci95_low'])}, "
                      f"{_signed(t['ci95_high'])}]{word}", _p(t["wilcoxon_p"])]
        seeds = next(iter(pair.values()))["seeds"]
        lines.append(f"| {name} | {reference} |" + (f" {short_machine(where)} |" if several else "")
                     + f" {seeds} | " + " | ".join(cells) + " |")
    (out / "paired_tests.md").write_text("\n".join(lines) + "\n")


def plot_versus(rows: list[dict], key: str, path: Path, title: str) -> None:
    """Test Dice (mean ± SD over the evaluated runs at each value) against the numeric column
    `key` (e.g. n_train), one line per machine: for a grid whose configurations differ in `key`
    alone (data_size)."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    points: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        x, y = row.get(key), row.get("test_dice")
        if row["status"] == "ok" and isinstance(x, (int, float)) and math.isfinite(x) \
                and math.isfinite(y):
            points.setdefault(short_machine(row["machine"]), {}).setdefault(float(x), []).append(y)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for where, by_x in sorted(points.items()):
        xs = sorted(by_x)
        ax.errorbar(xs, [statistics.fmean(by_x[x]) for x in xs], fmt="o-", capsize=3, label=where,
                    yerr=[statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs])
    ax.set(xlabel=key, ylabel="test Dice (tumour studies)", title=title)
    ax.grid(alpha=0.3)
    if points:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


README_BLOCK = re.compile(r"(<!-- from (\S+) -->\n)(.*?)(<!-- end -->)", re.S)


def sync_readme(readme: Path, check: bool = False) -> list[str]:
    """Put the current content of each committed results file into the README block that names
    it (`<!-- from results/leaderboard.md -->` ... `<!-- end -->`), so that the README's tables
    are the sweep's files, never numbers typed by hand. Returns the blocks that were (check:
    would be) changed."""
    text = readme.read_text()
    changed = []

    def fill(match: re.Match) -> str:
        source = readme.parent / match.group(2)
        if not source.is_file():
            raise config.ConfigError(f"{readme.name} shows {match.group(2)}, which does not "
                                     "exist: run the command the README gives beside it first")
        body = source.read_text()
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
                   parallel=1, only="", plot_vs="")
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
    if options["plot_vs"] and options["plot_vs"] not in COLUMNS:
        raise config.ConfigError(f"--plot_vs={options['plot_vs']}: give a numeric leaderboard.csv "
                                 "column, e.g. n_train or phantom_cases")
    bad = []
    for config_name, seed, overrides in plan:  # the whole plan is checked before any training
        try:
            config.make_config(_run_values(config_name, seed, overrides, options["budget"],
                                           roots[0], extra))
        except config.ConfigError as err:
            bad.append(f"  {config_name} (seed {seed}): {err}")
    if bad:
        raise config.ConfigError(f"--grid={options['grid']} --budget={options['budget']}: "
                                 f"{len(bad)} run(s) cannot start:\n" + "\n".join(bad)
                                 + f"\n(the budgets meant for this grid: "
                                 f"{', '.join(GRID_BUDGETS[options['grid']])})")
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
    found = collect(plan, roots, options["budget"], extra)
    rows = [row for row, _ in found]
    machines = sorted({row["machine"] for row in rows})
    out = Path(options["out"]) if options["out"] else Path(options["results_dir"]) / name
    title = f"{options['grid']} grid, budget {options['budget']}"
    write_results(rows, out, f"{title}: {len(rows)} runs on "
                  f"{' / '.join(machines) or 'no machine yet'}")
    write_paired_tests(paired_tests(found), out, title)
    if options["plot_vs"]:
        plot_versus(rows, options["plot_vs"], out / f"test_dice_vs_{options['plot_vs']}.png",
                    title)
    if options["export"]:
        for _, run_dir in found:
            export_evidence(run_dir, Path(options["export"]) / name / run_dir.name)
        print(f"evidence of {len(found)} runs: {Path(options['export']) / name}/")
    print(f"results: {out}/leaderboard.md, {out}/paired_tests.md")


if __name__ == "__main__":
    import runtime

    with runtime.exit_on_user_error():
        main(sys.argv[1:])
