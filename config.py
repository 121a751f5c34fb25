"""Every experiment setting in one frozen dataclass, presets, and the `--key=value` command line.

    python main.py                                  # preset `cpu`: phantom, small TransUNet, ~11 min
    python main.py --preset=cpu_long                # ~7x longer in bf16 (~55-85 min)
    python main.py --preset=paper --data_dir=/data/autoPET      # the published setting on a GPU
    python main.py --preset=tiny --out_dir=/tmp/runs            # seconds, for tests
    python main.py --epochs=3 --model=unet_resnet34 --lr=3e-4   # any field from the command line

Precedence: dataclass defaults < preset < command line. Values are parsed with
`ast.literal_eval` (so `--ct_window=(-1000,1000)`, `--data_dir=/x` and `--resume=None` all work),
ints are accepted for floats, and unknown keys are rejected with a did-you-mean message.
Standard library only (docs/ARCHITECTURE.md, "Code style"): this module is imported by every
entry point.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A setting the user gave is wrong: unknown key, bad value, unreadable config file."""

    user_error = True


@dataclass(frozen=True)
class Config:
    preset: str = "cpu"  # cpu | cpu_long | paper | tiny (applied before command-line values)

    # ---- run ----------------------------------------------------------------------------
    out_dir: str = "runs"  # run directories are created below this folder
    run_name: Optional[str] = None  # None -> "<preset>-<model>-<YYYYmmdd-HHMMSS>"
    resume: Optional[str] = None  # path of a run directory to continue (its config.json wins)
    device: str = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda | cuda:1
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)

    # ---- data ---------------------------------------------------------------------------
    data_dir: Optional[str] = None  # None -> the built-in phantom, generated once into cache_dir
    layout: str = "auto"  # auto | autopet | nnunet | dicom | png
    ct_channel: int = 0  # nnU-Net layout: which _000k file is CT (autoPET III: 0)
    pet_channel: int = 1  # ... and which is PET/SUV (autoPET III: 1; autoPET I baseline: 0)
    resample: bool = False  # resample CT and mask onto the PET grid when the grids differ
    cache_dir: str = "cache"  # preprocessed studies (and the phantom); never inside data_dir
    phantom_cases: int = 60  # studies generated when data_dir is None (half tumour-free)
    phantom_size: str = "demo"  # unit | demo | autopet (docs/phantom.md, "Sizes")
    phantom_seed: int = 0
    # None: the test studies are split off the phantom_cases studies; an int: they are n_test
    # studies of a phantom of this seed (never seen in training in any form), and the
    # phantom_cases studies are training + validation only (the cpu and tiny presets: 1)
    phantom_test_seed: Optional[int] = None
    ct_window: tuple = (-1000.0, 1000.0)  # HU range scaled to [-1, 1]
    suv_max: float = 20.0  # SUV clipped to [0, suv_max], scaled to [-1, 1]
    n_val: int = 10  # validation studies (checkpoint selection only)
    n_test: int = 20  # test studies (reported numbers only)
    split_seed: int = 0
    n_folds: int = 0  # >1: k-fold cross-validation, `fold` selects the test fold
    fold: int = 0
    context_slices: int = 0  # 2.5-D: neighbouring slices on each side as extra channels
    # Anatomy-aware training (docs/training.md "Auxiliary targets"): a second head on the shared
    # decoder learns organs (labels from ORGANS.nii.gz; the phantom writes them) or the
    # physiological uptake (SUV > uptake_suv outside the tumour, derived on the fly, any data).
    # Used only in training: at inference the model returns the lesion channel alone.
    aux_target: str = "none"  # none | organs | uptake
    w_aux: float = 1.0  # total = lesion loss + w_aux * (CE + Dice of the auxiliary head)
    n_organ_classes: int = 16  # organ labels 0..n-1 (the phantom's map: data/organs.py)
    uptake_suv: float = 3.0  # aux_target=uptake: SUV threshold of the uptake class
    p_misalign: float = 0.0  # PET/CT misalignment augmentation: CT shifted <= 4 mm, rotated <= 5 deg
    fg_fraction: float = 0.33  # share of training slices that contain tumour (nnU-Net: 1/3)
    # how those tumour slices are drawn: slice (uniform over tumour slices) | lesion (a lesion
    # uniform over all lesions, then one of its slices: small lesions as often as large ones)
    fg_sampling: str = "slice"
    # share of training slices that are hard negatives: tumour-free slices whose PET exceeds
    # uptake_suv somewhere (physiological uptake, found without labels; data/dataset.py); the
    # uniform share is 1 - fg_fraction - hot_fraction. 0 = off.
    hot_fraction: float = 0.0
    augment: bool = True
    num_workers: int = 0  # DataLoader workers

    # ---- model --------------------------------------------------------------------------
    model: str = "transunet_small"  # models.list_models(); paper: transunet_r50_vit_b16
    img_size: int = 128  # square, divisible by 16: the network input (resize: slices are resized
    # to it; patch: the crop / sliding-window tile size, at the slices' own resolution)
    # In-plane handling (docs/training.md, "In-plane handling: resize or patch"):
    # resize = every slice resampled to img_size x img_size (training and inference);
    # patch = img_size x img_size crops of the cached slice at its own spacing for training,
    # sliding-window tiles (Gaussian-weighted, `patch_overlap`) at inference.
    inplane: str = "resize"  # resize | patch
    # patch only: resample each study's in-plane grid ONCE in the cache to this spacing (mm;
    # CT/PET linear, labels nearest, z untouched); evaluation maps the probabilities back to the
    # study's original grid. None = the native spacing.
    target_spacing: Optional[float] = None
    patch_overlap: float = 0.5  # patch only: sliding-window overlap in [0.5, 1) (nnU-Net: 0.5)
    n_skip: int = 3  # TransUNet decoder skip connections (0-3)
    # local weight file: Google's R50+ViT-B_16.npz (transunet_*) or a state_dict (.pt / .pth);
    # "none" = from scratch, said explicitly (the paper preset requires one or the other)
    pretrained: Optional[str] = None
    grad_checkpointing: bool = False  # activation checkpointing of transformer blocks
    compile: bool = False  # torch.compile the model
    channels_last: str = "auto"  # auto (on CUDA) | True | False

    # ---- loss: w_bce*BCE + w_tversky*focal Tversky + w_dice*Dice (loss.py) ----------------
    w_bce: float = 0.6
    w_tversky: float = 0.4
    w_dice: float = 0.6
    tversky_fp_weight: float = 0.5  # the paper's alpha: weight of false positives
    tversky_fn_weight: float = 0.5  # the paper's beta: weight of false negatives
    tversky_gamma: float = 1.0  # focal exponent: (1 - TI) ** gamma
    tversky_weighting: str = "corrected"  # published | corrected | none (docs/loss.md)
    dice_log: bool = True  # -log(Dice) as in the published code; it is what gets training started
    # under this imbalance (1 - Dice is saturated while all probabilities are small: docs/loss.md)
    loss_reduction: str = "batch"  # batch | sample
    bce_pos_weight: Optional[float] = None  # BCE weight of the positive class (fair baseline)

    # ---- optimisation -------------------------------------------------------------------
    epochs: int = 10
    steps_per_epoch: int = 60
    batch_size: int = 16
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3  # AdamW; 1e-3 had not started to segment after 600 steps on the phantom
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    schedule: str = "cosine"  # cosine (with warm-up) | poly | constant, stepped per iteration
    warmup_steps: int = 30
    poly_power: float = 0.9
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # autocast: auto = bf16/fp16 on CUDA; bf16 on a CPU with bf16 in hardware (AVX512-BF16 /
    # AMX: 1.6x the training steps per second of float32 here), else float32 | True | False |
    # bf16 | fp16 (runtime.resolve_amp; the run logs and records the dtype it resolved to)
    amp: str = "auto"
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    sync_bn: str = "auto"  # DDP: SyncBatchNorm; auto = on CUDA when batch_size / GPUs < 16
    ema_decay: float = 0.0  # > 0: validation and evaluation use an exponential moving average
    # of the weights (decay per step, warmed up as min(decay, (1 + t) / (10 + t)))

    # ---- validation / evaluation --------------------------------------------------------
    val_every: int = 1  # validate every N epochs on whole validation studies
    early_stop_patience: int = 0  # validations without improvement; 0 = never stop early
    eval_batch_size: int = 32
    threshold: float = 0.5  # probability threshold for the binary mask
    # best checkpoint: pseudo_dice = the highest validation pseudo-Dice at `threshold`;
    # tuned_pseudo_dice = at the best threshold 0.05..0.95 of each epoch (blind to calibration)
    select_by: str = "pseudo_dice"
    tune_threshold: bool = False  # choose the threshold on the validation studies instead
    # (pooled Dice over 0.05..0.95; the fair BCE baseline of docs/study.md; saved in eval/summary.json)
    tta: bool = False  # flip test-time augmentation
    min_component_ml: float = 0.0  # post-processing: drop predicted components smaller than this
    suv_floor: float = 0.0  # post-processing: drop predicted voxels with SUV below this
    min_component_suvmax: float = 0.0  # post-processing: drop components whose SUVmax is below
    tune_postprocess: bool = False  # choose threshold + the three post-processing settings on
    # the validation studies (pooled Dice over metrics.POSTPROCESS_GRID; saved in summary.json)
    pp_thresholds: tuple = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # tune_postprocess: the threshold axis
    # tune_postprocess chooses by: pooled_dice = the Dice of all validation voxels pooled;
    # mean_dice = the mean of the tumour studies' own Dice, the figure the evaluation reports
    # mean_dice_fpv = mean_dice among the settings whose mean false-positive volume on the
    # tumour-free validation studies is <= pp_max_fpv_ml (the lowest volume where none is)
    # (metrics.postprocess_objective; docs/evaluation.md, "Post-processing")
    pp_objective: str = "pooled_dice"
    pp_max_fpv_ml: float = 1.0  # pp_objective=mean_dice_fpv: the limit, ml per tumour-free study
    n_bootstrap: int = 1000  # bootstrap resamples for confidence intervals
    save_overlays: bool = True
    # learning curves: after every validation also checkpoints/epoch_<k>.pt, the weights alone
    # (bench/learning_curve.py evaluates each on the test studies)
    keep_epoch_checkpoints: bool = False
    # > 0: the run is evaluated with the mean of the weights kept after the validations that fall
    # after this fraction of its steps (0.75: the last quarter), not the best checkpoint:
    # checkpoint averaging / SWA (Izmailov et al. 2018; docs/training.md, "Averaged weights").
    # Needs keep_epoch_checkpoints. test.py --checkpoint=best evaluates the best one instead.
    average_from: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def in_channels(self) -> int:
        """CT + PET for the centre slice and for `context_slices` neighbours on each side."""
        return 2 * (2 * self.context_slices + 1)


PRESETS: dict[str, dict[str, Any]] = {
    # The default: the built-in phantom and a scaled-down TransUNet of the same architecture,
    # sized so that phantom generation, training and evaluation take <= 15 minutes on 2 CPU
    # cores (results/main_cpu). 100 training + 30 validation studies of seed 0, 50 test studies
    # of a phantom of seed 1 (never seen in training); 2,200 AdamW steps at lr 1.5e-3 (bf16
    # autocast where the CPU has bf16 in hardware, amp=auto), validation every second epoch;
    # threshold and post-processing chosen on the validation studies. Over seeds 0-2 this
    # recipe scored test Dice 0.472 +- 0.023 raw, 0.461 +- 0.014 post-processed against
    # 0.423 +- 0.008 for the 1,400-step float32 recipe with 10 validation studies that it
    # replaced (paired +0.038 [+0.012, +0.072], p 0.006, 3/3 seeds; FPV 2.6 against 2.8 ml;
    # results/cpu2core/levers-1400, cand against lr15). bf16 makes a step ~1.6x faster here
    # (bench/bench_precision.py), which pays for the extra steps. lr 1.5e-3 rather than the
    # default 3e-3: Dice 0.423 +- 0.008 against 0.395 +- 0.066, paired +0.028 [+0.004, +0.049]
    # (levers-1400, lr15 against main_cpu). 30 validation studies rather than 10 halve the
    # false-positive volume at the same Dice (1.2 against 2.8 ml post-processed, p < 0.001;
    # n30lr15 against lr15); validating them every second epoch keeps the run in budget.
    # No auxiliary head and no moving average of the weights: with them the same recipe scored
    # Dice 0.351 and FPV 5.8 ml against 0.439 and 2.8 ml without (results/cpu_uptake_ema,
    # results/cpu_no_aux_ema), and each raised the FPV in 3 of 3 seeds of the levers grid
    # (results/cpu2core/levers-quick).
    # Flip TTA at evaluation: on the weights of seeds 0 and 1 of this recipe (results/cpu2core/
    # levers-1400, cpuk_s*.eval-tta against cpu22_s*: the same training, reproduced), test Dice
    # 0.509 / 0.535 raw against 0.471 / 0.495 without, 0.496 / 0.494 against 0.467 / 0.472
    # post-processed, FPV 2.4 / 2.2 against 3.2 / 3.1 ml post-processed. Averaging the weights of
    # the last quarter (cpu_long) did not help at this length (cpuk_s*.eval-average0.75*).
    # Half the training slices drawn from the tumour-free slices with physiological uptake
    # (hot_fraction=0.5, hard negatives): over seeds 0-2 (results/main_cpu_hot50*, paired with
    # results/main_cpu_k*, the same recipe without it on the same machine; row main_cpu_hot50
    # of results/cpu2core/pp-objective/table_main.md) false-positive volume 1.21 / 1.11 ml raw /
    # post-processed against 2.47 / 1.98 (paired -0.87 ml [-1.29, -0.48], p 0.0001, 3/3 seeds),
    # test Dice 0.498 / 0.483 against 0.492 / 0.476 (+0.008, p 0.21), recall 0.51 / 0.47
    # against 0.56 / 0.47.
    "cpu": dict(phantom_test_seed=1, phantom_cases=130, n_val=30, n_test=50, epochs=22,
                steps_per_epoch=100, val_every=2, lr=1.5e-3, tune_postprocess=True, tta=True,
                hot_fraction=0.5),
    # The cpu recipe at lr 3e-3 trained ~7x longer: 16,000 steps (64 epochs of 250, warm-up
    # 100), bf16 autocast where the CPU has bf16 in hardware, 100 training + 30 validation
    # studies validated every second epoch, every validated epoch's weights kept; evaluated with
    # the mean of the weights kept in the last quarter (epochs 50-64, average_from=0.75) and
    # flip TTA. Two seeds trained from an empty cache alone on 2 cores (bench/main_run.py, 83.0
    # and 66.8 min; results/cpu_long_bf16, results/cpu_long_bf16_s1), evaluated so with
    # `test.py --checkpoint=average --average_from=0.75 --tta=True` (eval-average0.75-tta in
    # each folder): test Dice 0.650 / 0.668 raw, 0.658 / 0.669 post-processed, FPV 1.9 / 1.4 ml
    # post-processed, lesion recall 0.82 / 0.74, against 0.618 / 0.630 raw and 0.594 / 0.609
    # post-processed for the best epoch without TTA (README, "The longer CPU recipe"). A third
    # seed run with this preset from scratch (results/cpu_long_s2, 54.9 min): 0.622 / 0.590;
    # a fourth (results/cpu_long_s3, 62.5 min): 0.643 / 0.648. Four-seed mean 0.646 +- 0.019
    # raw / 0.641 +- 0.035 post-processed (levers-1400/table_vs_long64.md), below the 0.65
    # target. The phantom oracle scores 0.664 here. The headline comparisons at this length,
    # seed 3, paired with seed 3 over the test studies (README "The headline comparisons near
    # convergence"): the published loss 0.626 raw (no difference); the organ head
    # (--aux_target=organs, results/cpu_long_org_s3, 77 min) 0.649 raw / 0.634 post-processed,
    # FPV 0.85 / 0.82 ml, recall 0.76 / 0.71 (no significant difference). Over four seeds
    # (results/cpu_long_org_s0 ... _s3, 69-80 min) the organ head gives 0.648 / 0.644 and FPV
    # 0.95 / 0.93 ml against 1.52 / 1.46 (paired -0.53 ml [-1.25, +0.03], Wilcoxon p 0.85):
    # not significant, and organ labels are not in every data set, so the preset has no head;
    # add --aux_target=organs where the data has organ labels. With 200 training studies
    # (--phantom_cases=230, four seeds, results/cpu_long_d230_s0 ... _s3, 58-65 min) 0.652 +- 0.010
    # raw / 0.627 +- 0.016 post-processed (paired -0.014 [-0.068, +0.029], p 0.63): the raw masks
    # above 0.65, the post-processed ones below; the preset keeps 100. Their weights with
    # --pp_objective=mean_dice: 0.659 +- 0.009 post-processed at FPV 1.93 ml (1.21 pooled).
    # Organ head + 200 studies (seed 0, results/cpu_long_org_d230_s0): 0.676 raw at 0.72 ml, recall
    # 0.81; 0.635 post-processed; but 120.7 min on a CPU 1.5x slower per step: one seed, over budget.
    # Cut to 44 epochs (seed 1, results/cpu_long_org_d230_e44_s1): 93.8 min on a slower host still,
    # 0.642 raw / 0.632 post-processed at 1.02 / 1.00 ml, recall 0.77 / 0.74: Dice short of 0.65.
    "cpu_long": dict(phantom_test_seed=1, phantom_cases=130, n_val=30, n_test=50, epochs=64,
                     steps_per_epoch=250, warmup_steps=100, val_every=2, tune_postprocess=True,
                     keep_epoch_checkpoints=True, average_from=0.75, tta=True),
    # The published setting: R50-ViT-B_16 at 224², official TransUNet recipe (SGD 0.01, momentum
    # 0.9, weight decay 1e-4, poly 0.9 per iteration, batch 24, ~14k iterations) and the published
    # loss weights with the published focal-Tversky formula and -log Dice. CUDA + AMP.
    "paper": dict(
        model="transunet_r50_vit_b16", img_size=224, batch_size=24, optimizer="sgd", lr=0.01,
        momentum=0.9, weight_decay=1e-4, schedule="poly", warmup_steps=0, epochs=60,
        steps_per_epoch=250, tversky_weighting="published", dice_log=True, num_workers=8,
        n_val=50, n_test=200, phantom_size="autopet", phantom_cases=300, eval_batch_size=64,
    ),
    # Seconds, for tests: unit-size phantom, a tiny TransUNet.
    "tiny": dict(
        model="transunet_tiny", img_size=64, phantom_size="unit", phantom_cases=8,
        phantom_test_seed=1, n_val=2,
        n_test=2, epochs=2, steps_per_epoch=3, batch_size=4, warmup_steps=1, eval_batch_size=16,
        n_bootstrap=50, save_overlays=True,
    ),
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _type_ok(value: Any, annotation: Any) -> bool:
    """True when `value` fits the field's annotation (ints accepted for floats)."""
    tp = typing.get_type_hints(Config)[annotation] if isinstance(annotation, str) else annotation
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, tp)


def _coerce(key: str, value: Any) -> Any:
    tp = typing.get_type_hints(Config)[key]
    if key in ("amp", "channels_last", "sync_bn") and isinstance(value, bool):
        value = str(value)  # tri-state settings: "auto", "True", "False"
    if not _type_ok(value, tp):
        expected = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"--{key}={value!r}: expected {expected}, got {type(value).__name__}")
    if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                       and float in typing.get_args(tp) and isinstance(value, int)):
        return float(value) if value is not None else None
    if tp is tuple:
        return tuple(value)
    return value


def _check_key(key: str) -> None:
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        raise ConfigError(f"unknown setting --{key}{hint} (all settings: config.py)")


def parse_value(raw: str) -> Any:
    """`ast.literal_eval`, falling back to the raw string (paths, names)."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        return raw


# Allowed values, checked before any work is done (a bad value ends with exit code 2 naming the
# key, never a traceback later). Model names and model options are checked by building the
# model (factory.check_settings), the rest here.
CHOICES = {
    "layout": ("auto", "autopet", "nnunet", "dicom", "png"),
    "phantom_size": ("unit", "demo", "autopet"),
    "tversky_weighting": ("published", "corrected", "none"),
    "loss_reduction": ("batch", "sample"),
    "aux_target": ("none", "organs", "uptake"),
    "optimizer": ("adamw", "sgd"),
    "schedule": ("cosine", "poly", "constant"),
    "select_by": ("pseudo_dice", "tuned_pseudo_dice"),
    "pp_objective": ("pooled_dice", "mean_dice", "mean_dice_fpv"),
    "fg_sampling": ("slice", "lesion"),
    "amp": ("auto", "True", "False", "bf16", "fp16"),
    "channels_last": ("auto", "True", "False"),
    "inplane": ("resize", "patch"),
}
# key -> (lowest, highest, lowest allowed itself, highest allowed itself); None = unbounded
RANGES = {
    "epochs": (1, None, True, True), "steps_per_epoch": (1, None, True, True),
    "batch_size": (1, None, True, True), "val_every": (1, None, True, True),
    "eval_batch_size": (1, None, True, True), "phantom_cases": (2, None, True, True),
    "n_val": (0, None, True, True), "n_test": (0, None, True, True),
    "num_workers": (0, None, True, True), "warmup_steps": (0, None, True, True),
    "max_nonfinite": (0, None, True, True), "early_stop_patience": (0, None, True, True),
    "context_slices": (0, None, True, True), "n_skip": (0, 3, True, True),
    "n_bootstrap": (0, None, True, True), "seed": (0, None, True, True),
    "split_seed": (0, None, True, True), "phantom_seed": (0, None, True, True),
    "n_organ_classes": (2, 256, True, True), "ct_channel": (0, None, True, True),
    "pet_channel": (0, None, True, True), "img_size": (16, None, True, True),
    "phantom_test_seed": (0, None, True, True),
    "lr": (0.0, None, False, True), "weight_decay": (0.0, None, True, True),
    "momentum": (0.0, 1.0, True, False), "poly_power": (0.0, None, False, True),
    "grad_clip": (0.0, None, True, True), "threshold": (0.0, 1.0, False, False),
    "fg_fraction": (0.0, 1.0, True, True), "suv_max": (0.0, None, False, True),
    "hot_fraction": (0.0, 1.0, True, True),
    "w_bce": (0.0, None, True, True), "w_tversky": (0.0, None, True, True),
    "w_dice": (0.0, None, True, True), "w_aux": (0.0, None, True, True),
    "tversky_fp_weight": (0.0, None, True, True), "tversky_fn_weight": (0.0, None, True, True),
    "tversky_gamma": (0.0, None, False, True), "bce_pos_weight": (0.0, None, False, True),
    "min_component_ml": (0.0, None, True, True), "suv_floor": (0.0, None, True, True),
    "min_component_suvmax": (0.0, None, True, True),
    "pp_max_fpv_ml": (0.0, None, True, True),
    "uptake_suv": (0.0, None, False, True), "p_misalign": (0.0, 1.0, True, True),
    "ema_decay": (0.0, 1.0, True, False),
    "average_from": (0.0, 1.0, True, False),
    "target_spacing": (0.0, None, False, True), "patch_overlap": (0.5, 1.0, True, False),
}


def _check_range(key: str, value: Any) -> None:
    if value is None:  # an Optional setting left unset
        return
    low, high, low_ok, high_ok = RANGES[key]
    fine = (low is None or value > low or (low_ok and value == low)) and \
        (high is None or value < high or (high_ok and value == high))
    if not fine:
        interval = (("[" if low_ok else "(") + f"{'-inf' if low is None else low}, "
                    f"{'inf' if high is None else high}" + ("]" if high_ok else ")"))
        raise ConfigError(f"--{key}={value!r} is out of range: it must lie in {interval}")


def check_pp_thresholds(values: Any, name: str) -> list[float]:
    """The threshold candidates of tune_postprocess: at least one, ascending, each in (0, 1);
    returned as floats."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        values = []
    if not values or any(not 0 < v < 1 for v in values) or \
            any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"{name}={values if values else '?'}: give ascending probability "
                          f"thresholds in (0, 1), e.g. {name}=0.3,0.5,0.7,0.9")
    return values


def _validate(cfg: Config) -> None:
    """Every value and combination that can be checked without building anything."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"--{key}={getattr(cfg, key)!r}: choose one of {', '.join(choices)}")
    for key in RANGES:
        _check_range(key, getattr(cfg, key))
    if cfg.img_size % 16:
        raise ConfigError(f"--img_size={cfg.img_size} must be divisible by 16 (the ViT patch grid)")
    if len(cfg.ct_window) != 2 or cfg.ct_window[0] >= cfg.ct_window[1]:
        raise ConfigError(f"--ct_window={cfg.ct_window}: give (low, high) in HU with low < high")
    check_pp_thresholds(cfg.pp_thresholds, "--pp_thresholds")
    if cfg.w_bce + cfg.w_tversky + cfg.w_dice == 0:
        raise ConfigError("--w_bce, --w_tversky and --w_dice are all 0: the lesion loss would be 0; "
                          "give at least one a positive weight")
    if cfg.fg_fraction + cfg.hot_fraction > 1.0 + 1e-9:
        raise ConfigError(f"--hot_fraction={cfg.hot_fraction} with --fg_fraction={cfg.fg_fraction}: "
                          f"the two shares add up to more than 1; lower one of them")
    if cfg.ct_channel == cfg.pet_channel:
        raise ConfigError(f"--ct_channel and --pet_channel are both {cfg.ct_channel}; they must differ")
    if cfg.n_folds == 1 or cfg.n_folds < 0:
        raise ConfigError(f"--n_folds={cfg.n_folds}: use 0 (no cross-validation) or >= 2")
    if cfg.n_folds > 1 and not 0 <= cfg.fold < cfg.n_folds:
        raise ConfigError(f"--fold={cfg.fold} must be in 0..{cfg.n_folds - 1} (--n_folds={cfg.n_folds})")
    held_out = cfg.n_val + (0 if cfg.phantom_test_seed is not None else cfg.n_test)
    if cfg.data_dir is None and cfg.n_folds == 0 and held_out >= cfg.phantom_cases:
        raise ConfigError(f"--n_val={cfg.n_val}" + ("" if cfg.phantom_test_seed is not None else
                          f" + --n_test={cfg.n_test}") + f" leave no training study of the "
                          f"{cfg.phantom_cases} phantom studies; raise --phantom_cases")
    if cfg.data_dir is None and cfg.phantom_test_seed is not None:
        if cfg.phantom_test_seed == cfg.phantom_seed:
            raise ConfigError(f"--phantom_test_seed={cfg.phantom_test_seed} equals --phantom_seed: "
                              "the test phantom must be another seed")
        if cfg.n_folds:
            raise ConfigError("--n_folds with a separate test phantom: set --phantom_test_seed=None "
                              "to cross-validate on the phantom_cases studies")
        if cfg.n_test < 1:
            raise ConfigError("--n_test=0 with --phantom_test_seed: give --n_test >= 1 or "
                              "--phantom_test_seed=None")
    _validate_inplane(cfg)
    if cfg.average_from > 0:
        if not cfg.keep_epoch_checkpoints:
            raise ConfigError(f"--average_from={cfg.average_from} averages the weights kept after "
                              "each validation: add --keep_epoch_checkpoints=True")
        if cfg.n_val == 0:
            raise ConfigError(f"--average_from={cfg.average_from} averages the weights kept after "
                              "each validation, and --n_val=0 validates nothing: give --n_val >= 1")
        if cfg.early_stop_patience:
            raise ConfigError(f"--average_from={cfg.average_from} averages the end of a run of "
                              f"known length; --early_stop_patience={cfg.early_stop_patience} can "
                              "end it before that part: use one of them")
    if cfg.warmup_steps >= cfg.epochs * cfg.steps_per_epoch:
        raise ConfigError(f"--warmup_steps={cfg.warmup_steps} is not shorter than the run "
                          f"({cfg.epochs} x {cfg.steps_per_epoch} steps); lower it")


def _validate_inplane(cfg: Config) -> None:
    """target_spacing and patch_overlap belong to --inplane=patch: in resize mode every slice is
    resampled to img_size² whatever its spacing, and there is no sliding window, so either
    setting would silently do nothing there."""
    if cfg.inplane == "patch":
        return
    if cfg.target_spacing is not None:
        raise ConfigError(f"--target_spacing={cfg.target_spacing} resamples the cache for "
                          f"--inplane=patch; with --inplane=resize every slice is resized to "
                          f"--img_size={cfg.img_size} anyway. Drop it, or set --inplane=patch")
    if cfg.patch_overlap != Config.patch_overlap:
        raise ConfigError(f"--patch_overlap={cfg.patch_overlap} is the sliding-window overlap of "
                          "--inplane=patch; resize mode predicts whole resized slices. Drop it, "
                          "or set --inplane=patch")


def _validate_new_run(cfg: Config) -> None:
    """Rules for a run about to start (not for the saved config of a finished run)."""
    if cfg.preset == "paper" and cfg.pretrained is None:
        raise ConfigError("--preset=paper is the published setting, which starts from the "
                          "ImageNet-21k R50+ViT-B/16 weights: give --pretrained=<path to "
                          "R50+ViT-B_16.npz>, or --pretrained=none to train from scratch")
    if cfg.pretrained is not None and cfg.pretrained.lower() != "none" and \
            not Path(cfg.pretrained).is_file():
        raise ConfigError(f"--pretrained={cfg.pretrained}: no such file; give a local weight "
                          "file (nothing is downloaded) or --pretrained=none")


def make_config(overrides: Optional[dict[str, Any]] = None) -> Config:
    """Defaults < preset < overrides; every key checked, every value type-checked."""
    overrides = dict(overrides or {})
    for key in overrides:
        _check_key(key)
    preset = overrides.get("preset", Config.preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    cfg = Config(**{key: _coerce(key, value) for key, value in values.items()})
    _validate(cfg)
    _validate_new_run(cfg)
    return cfg


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key=value` arguments -> {key: value} as given (keys checked, values parsed, not yet
    type-checked). `--flag` alone means True."""
    overrides: dict[str, Any] = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; settings are given as --key=value")
        key, sep, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        _check_key(key)
        overrides[key] = parse_value(raw) if sep else True
    return overrides


def parse_cli(argv: list[str]) -> Config:
    """`--key=value` arguments -> Config (defaults < preset < these)."""
    return make_config(parse_overrides(argv))


def save_config(cfg: Config, path: str | os.PathLike, extra: Optional[dict] = None) -> None:
    """Write the resolved config (plus e.g. environment facts under "environment") atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": cfg.to_dict(), **(extra or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from saved values without re-applying a preset over them."""
    for key in values:
        _check_key(key)
    cfg = Config(**{key: _coerce(key, value) for key, value in values.items()})
    _validate(cfg)
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    """Read `runs/<name>/config.json` (or a run directory) back into the exact Config."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; pass the run directory written by main.py") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); restore it or re-run") from None
    return config_from_dict(payload.get("config", payload))
