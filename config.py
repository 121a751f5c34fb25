"""Every experiment setting in one frozen dataclass, presets, and the `--key=value` command line.

    python main.py                                  # preset `cpu`: phantom, small TransUNet, ~10 min
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A setting the user gave is wrong: unknown key, bad value, unreadable config file."""

    user_error = True


@dataclass(frozen=True)
class Config:
    preset: str = "cpu"  # cpu | paper | tiny (applied before command-line values)

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
    augment: bool = True
    num_workers: int = 0  # DataLoader workers

    # ---- model --------------------------------------------------------------------------
    model: str = "transunet_small"  # models.list_models(); paper: transunet_r50_vit_b16
    img_size: int = 128  # square, divisible by 16; slices are resized to it
    n_skip: int = 3  # TransUNet decoder skip connections (0-3)
    pretrained: Optional[str] = None  # local weight file (.npz of Google's R50+ViT-B_16, or .pt)
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
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU) | True | False
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops

    # ---- validation / evaluation --------------------------------------------------------
    val_every: int = 1  # validate every N epochs on whole validation studies
    early_stop_patience: int = 0  # validations without improvement; 0 = never stop early
    eval_batch_size: int = 32
    threshold: float = 0.5  # probability threshold for the binary mask
    tune_threshold: bool = False  # choose the threshold on the validation studies instead
    # (pooled Dice over 0.05..0.95; the fair BCE baseline of docs/study.md; saved in eval/summary.json)
    tta: bool = False  # flip test-time augmentation
    min_component_ml: float = 0.0  # post-processing: drop predicted components smaller than this
    suv_floor: float = 0.0  # post-processing: drop predicted voxels with SUV below this
    n_bootstrap: int = 1000  # bootstrap resamples for confidence intervals
    save_overlays: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def in_channels(self) -> int:
        """CT + PET for the centre slice and for `context_slices` neighbours on each side."""
        return 2 * (2 * self.context_slices + 1)


PRESETS: dict[str, dict[str, Any]] = {
    # The default: the built-in phantom and a scaled-down TransUNet of the same architecture,
    # sized so that training + evaluation take about 10 minutes on 2 CPU cores.
    "cpu": {},
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
        model="transunet_tiny", img_size=64, phantom_size="unit", phantom_cases=8, n_val=2,
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
    if key in ("amp", "channels_last") and isinstance(value, bool):
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


def _validate(cfg: Config) -> None:
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.img_size % 16:
        raise ConfigError(f"--img_size={cfg.img_size} must be divisible by 16 (the ViT patch grid)")
    if cfg.layout not in ("auto", "autopet", "nnunet", "dicom", "png"):
        raise ConfigError(f"--layout={cfg.layout!r}: choose auto, autopet, nnunet, dicom or png")
    if cfg.tversky_weighting not in ("published", "corrected", "none"):
        raise ConfigError(f"--tversky_weighting={cfg.tversky_weighting!r}: "
                          "choose published, corrected or none")
    if len(cfg.ct_window) != 2 or cfg.ct_window[0] >= cfg.ct_window[1]:
        raise ConfigError(f"--ct_window={cfg.ct_window}: give (low, high) in HU with low < high")
    if not 0.0 <= cfg.fg_fraction <= 1.0:
        raise ConfigError(f"--fg_fraction={cfg.fg_fraction} must be within [0, 1]")
    if cfg.aux_target not in ("none", "organs", "uptake"):
        raise ConfigError(f"--aux_target={cfg.aux_target!r}: choose none, organs or uptake")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"--optimizer={cfg.optimizer!r}: choose adamw or sgd")
    if cfg.schedule not in ("cosine", "poly", "constant"):
        raise ConfigError(f"--schedule={cfg.schedule!r}: choose cosine, poly or constant")
    for key in ("amp", "channels_last"):
        if getattr(cfg, key) not in ("auto", "True", "False"):
            raise ConfigError(f"--{key}={getattr(cfg, key)!r}: choose auto, True or False")


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
    return cfg


def parse_cli(argv: list[str]) -> Config:
    """`--key=value` arguments -> Config. `--flag` alone means True."""
    overrides: dict[str, Any] = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; settings are given as --key=value")
        key, sep, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        _check_key(key)
        overrides[key] = parse_value(raw) if sep else True
    return make_config(overrides)


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
