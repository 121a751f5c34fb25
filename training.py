"""The training loop: one `run_epoch` for training and validation, checkpoints, exact resume,
DDP, mixed precision and logging. Called by main.py; not a script itself:

    python main.py                                   # CPU preset (AdamW, warm-up + cosine)
    python main.py --preset=paper --data_dir=/data/autoPET          # one GPU (SGD + poly, AMP)
    torchrun --nproc_per_node=8 main.py --preset=paper --data_dir=/data/autoPET   # DDP
    python main.py --resume=runs/<name>              # continue a stopped run exactly

Design (docs/training.md): item i of epoch e of the training set depends only on (seed, e, i),
so the position in a run is (epoch, step_in_epoch). A checkpoint stores that position, the
model / optimizer / scheduler / GradScaler states and every RNG state; resuming rebuilds the
DataLoader from index step_in_epoch * batch_size on and ends, on CPU, with bit-identical
weights to the run that was never stopped. SIGINT / SIGTERM only set a flag; the loop checks
it after every step (and between validation studies), writes `checkpoints/last.pt` and
returns with `interrupted=True`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import checkpoint
import models
import runtime
from metrics import THRESHOLD_CANDIDATES, counts_above
from data import worker_init_fn
from runlog import LOSS_PARTS, RunLog, summary_line

log = logging.getLogger(__name__)

class TrainingError(RuntimeError):
    """A training run cannot go on because of a setting or the data (not a bug): the message says
    what happened and what to change."""

    user_error = True


# ---- settings and state ------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """The settings the loop reads, by their config.py names (see the comments there).
    `from_config` projects a resolved Config onto them, so the run's config.json stays the one
    source of truth; tests build them directly."""

    epochs: int
    steps_per_epoch: int | None  # None: len(train_set) // batch_size
    batch_size: int  # the global batch; each of W processes takes batch_size / W
    lr: float
    weight_decay: float
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    poly_power: float = 0.9
    grad_clip: float = 1.0
    amp: Any = "auto"
    channels_last: Any = "auto"
    compile: bool = False
    num_workers: int = 0
    val_every: int = 1
    early_stop_patience: int = 0
    max_nonfinite: int = 10
    seed: int = 0
    deterministic: bool = False
    ema_decay: float = 0.0  # > 0: validate / evaluate an exponential moving average of the weights
    sync_bn: Any = "auto"  # DDP: BatchNorm -> SyncBatchNorm (auto: CUDA, < 16 images per GPU)
    img_size: int = 128
    context_slices: int = 0
    inplane: str = "resize"  # validation path: resize (predict_volume) | patch (sliding window)
    patch_overlap: float = 0.5  # patch: sliding-window overlap
    eval_batch_size: int = 32  # validation: slices per forward pass
    threshold: float = 0.5
    select_by: str = "pseudo_dice"  # best checkpoint: pseudo_dice (at threshold) | tuned_pseudo_dice
    keep_epoch_checkpoints: bool = False  # the weights after every validation: epoch_<k>.pt
    log_images: bool = True  # validation previews in TensorBoard

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainSettings":
        names = {f.name for f in dataclasses.fields(cls)} - {"log_images"}
        return cls(**{name: getattr(cfg, name) for name in names})


@dataclass
class LoopState:
    """Where a run stands; saved in every checkpoint and restored on resume. `epoch` counts the
    epochs completed (training and validation), `step_in_epoch` the steps done in epoch `epoch`,
    `epoch_sums` the running loss sums of that partial epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    epoch_sums: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one record per finished epoch (rank 0)
    best_key: list | None = None  # [val (tuned) pseudo-Dice, -val FPV] of the best epoch
    best_epoch: int = 0
    stale_validations: int = 0
    seconds: float = 0.0  # training + validation time over all sessions of the run


# ---- optimiser and learning-rate schedule ------------------------------------------------


def lr_factor(it: int, *, total_steps: int, schedule: str, warmup_steps: int = 0,
              poly_power: float = 0.9) -> float:
    """Multiplier of the base learning rate at iteration `it` (0-based, per optimizer step).

    warm-up (it < W):  (it + 1) / W                          (linear, never 0)
    poly:              (1 - it / T) ** power                  official TransUNet: lr * (1 - i/max_i)^0.9
    cosine:            0.5 * (1 + cos(pi * (it - W) / (T - W)))   decays to 0 at it = T
    constant:          1
    """
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "poly":
        return max(0.0, 1.0 - it / total_steps) ** poly_power
    if schedule == "cosine":
        progress = min(1.0, (it - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TrainingError(f"schedule={schedule!r}: choose cosine, poly or constant")


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.Optimizer:
    """SGD (momentum, no Nesterov: the official TransUNet recipe) or AdamW (decoupled decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise TrainingError(f"optimizer={name!r}: choose adamw or sgd")


# ---- stop signals ------------------------------------------------------------------------


class StopSignal:
    """Within `with StopSignal() as stop:` SIGINT / SIGTERM only set `stop.signum`; the loop
    checks it at safe points. A second Ctrl-C raises KeyboardInterrupt (the user insists).
    Handlers are installed only in the main thread (Python's rule) and restored on exit."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- the loop ------------------------------------------------------------------------------


@dataclass
class Loop:
    """What every step needs; `step` is the global optimizer-step counter (skipped steps count)."""

    model: nn.Module  # the module called in training (maybe DDP / compiled)
    raw_model: nn.Module  # the plain model: state_dict, validation
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    grad_clip: float
    max_nonfinite: int
    stop: StopSignal
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    stop_agreed: bool = False  # every rank saw the same decision (DDP all-reduce)
    validation: dict = field(default_factory=dict)  # inference.predict_study options
    ema: nn.Module | None = None  # moving average of raw_model's weights (ema_decay > 0)
    ema_decay: float = 0.0

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation judges (and the best checkpoint keeps for evaluation)."""
        return self.ema if self.ema is not None else self.raw_model


def ema_decay_at(step: int, decay: float) -> float:
    """Decay of the moving average after optimizer step `step` (1-based): min(decay,
    (1 + step) / (10 + step)), so that the first steps are not dominated by the random
    initialisation (the warm-up of timm's ModelEmaV2 / TensorFlow's ExponentialMovingAverage
    with num_updates)."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for floating-point parameters and buffers
    (BatchNorm running statistics included); integer buffers are copied."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(m.detach(), alpha=1.0 - decay)
        else:
            e.copy_(m)


def loss_parts(loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor,
               aux: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"total", and the LOSS_PARTS the loss offers through `.parts()`} (float32). `aux`: the
    auxiliary target (B, S, S) int64, passed on only when the batch carries one."""
    extra = () if aux is None else (aux,)
    if hasattr(loss_fn, "parts"):
        parts = loss_fn.parts(logits, target, *extra)
        return {"total": parts["total"], **{k: parts[k] for k in LOSS_PARTS if k in parts}}
    return {"total": loss_fn(logits, target, *extra)}


def train_step(loop: Loop, image: torch.Tensor, mask: torch.Tensor,
               aux: torch.Tensor | None = None) -> dict[str, float] | None:
    """One optimizer step on a batch: image (B, C, S, S), mask (B, 1, S, S), and the auxiliary
    target aux (B, S, S) int64 when the training set has one (the model's train-mode output is
    then (B, 1 + K, S, S)).

    Returns the loss parts, or None when the loss was not finite on some rank: then nothing is
    updated (no backward, no optimizer step) on any rank. One all-reduce per step under DDP
    carries the loss parts, the non-finite flag and the stop flag, so every rank skips and stops
    at the same step. The scheduler advances either way (the schedule follows the step count).
    """
    image = image.to(loop.device, non_blocking=True)
    mask = mask.to(loop.device, non_blocking=True)
    if aux is not None:
        aux = aux.to(loop.device, non_blocking=True)
    if loop.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(loop.device.type, dtype=loop.amp_dtype or torch.float32,
                        enabled=loop.amp_dtype is not None):
        logits = loop.model(image)  # (B, 1, S, S), or (B, 1 + K, S, S) with an auxiliary head
    parts = loss_parts(loop.loss_fn, logits.float(), mask, aux)  # the loss in float32
    total = parts["total"]
    values = torch.stack([p.detach().float() for p in parts.values()])
    flags = torch.stack([(~torch.isfinite(total.detach())).float(),
                         torch.tensor(float(loop.stop.signum > 0), device=total.device)])
    packed = torch.cat([values.nan_to_num(0.0, 0.0, 0.0), flags])
    if runtime.is_distributed():
        dist.all_reduce(packed)  # SUM: loss parts summed over ranks, flags > 0 if any rank
        packed[: len(values)] /= dist.get_world_size()
    *means, nonfinite, stop = packed.tolist()
    loop.stop_agreed = stop > 0
    loop.step += 1
    if nonfinite > 0:
        _skip_step(loop, f"non-finite loss ({total.item()})")
        return None
    loop.nonfinite_run = 0
    loop.scaler.scale(total).backward()
    loop.scaler.unscale_(loop.optimizer)  # clip the true gradients (a no-op without fp16 scaling)
    max_norm = loop.grad_clip if loop.grad_clip and loop.grad_clip > 0 else float("inf")
    grad_norm = nn.utils.clip_grad_norm_(loop.raw_model.parameters(), max_norm)
    if not loop.scaler.is_enabled() and not torch.isfinite(grad_norm):
        # A finite loss can still have a non-finite gradient; stepping would turn every weight
        # into NaN (clipping scales by inf/nan). fp16's GradScaler already skips such steps.
        # The norm is computed after DDP's all-reduce, so every rank takes the same decision.
        _skip_step(loop, f"non-finite gradient norm ({grad_norm.item()})")
        return None
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    if loop.ema is not None:
        update_ema(loop.ema, loop.raw_model, ema_decay_at(loop.step, loop.ema_decay))
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    return dict(zip(parts, means))


def _skip_step(loop: Loop, reason: str) -> None:
    """No update this step (the schedule still advances); stop after too many in a row."""
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.nonfinite_total += 1
    loop.nonfinite_run += 1
    log.warning("step %d: %s; step skipped (%d in a row, %d in total)",
                loop.step, reason, loop.nonfinite_run, loop.nonfinite_total)
    if loop.nonfinite_run > loop.max_nonfinite:
        raise TrainingError(
            f"the loss or its gradient was not finite for {loop.nonfinite_run} steps in a row "
            f"(step {loop.step}): lower --lr, raise --warmup_steps, keep --grad_clip > 0, try "
            "--amp=False, and check the images for NaN; max_nonfinite sets the tolerance")


def validate_study(loop: Loop, study: Any, threshold: float) -> dict:
    """Predict one whole 3-D study (`inference.predict_study`: the run's in-plane path, the one
    test.py evaluates with) and count voxels against its cached mask (X, Y, Z), on the cache
    grid (the resampled one with target_spacing: checkpoint selection, not the reported score)."""
    from inference import predict_study

    prob = predict_study(loop.eval_model, study, device=loop.device, **loop.validation)  # (X, Y, Z)
    pred = prob > threshold
    ref = np.moveaxis(np.asarray(study.mask()), 0, -1) > 0  # (Z, X, Y) -> (X, Y, Z)
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    counts = counts_above(prob, ref)  # TP, FP, FN at every THRESHOLD_CANDIDATES threshold
    voxel_ml = float(np.prod(study.spacing)) / 1000.0
    preview = None
    if ref.any():  # the axial slice with the most tumour: PET (channel 1), ground truth, prediction
        z = int(ref.sum(axis=(0, 1)).argmax())
        pet = (np.asarray(study.image()[z, 1], dtype=np.float32) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        preview = np.stack([pet.clip(0, 1), ref[:, :, z], pred[:, :, z]]).astype(np.float32)
    return {"case_id": study.case_id, "tp": tp, "fp": fp, "fn": fn, "counts": counts,
            "has_tumor": bool(ref.any()),
            "pred_ml": float(pred.sum()) * voxel_ml,
            "dice": 2 * tp / (2 * tp + fp + fn) if ref.any() else math.nan, "preview": preview}


def summarise_validation(rows: list[dict]) -> dict:
    """pseudo-Dice = 2 ΣTP / (2 ΣTP + ΣFP + ΣFN) over all validation voxels (nnU-Net's online
    validation), the mean per-study Dice over studies with tumour, and the mean predicted volume
    (= false-positive volume, ml) over tumour-free studies. NaN where a subset is empty.
    val_tuned_pseudo_dice is the highest pseudo-Dice over the thresholds THRESHOLD_CANDIDATES
    (ties to the higher threshold), val_tuned_threshold the threshold that gives it: a score
    of the epoch that does not depend on how its probabilities happen to be calibrated."""
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    tumour = [r["dice"] for r in rows if r["has_tumor"]]
    empty = [r["pred_ml"] for r in rows if not r["has_tumor"]]
    denominator = 2 * tp + fp + fn
    tuned, tuned_threshold = math.nan, math.nan
    if rows:
        ctp, cfp, cfn = sum(r["counts"] for r in rows).T.astype(float)
        denominators = 2 * ctp + cfp + cfn
        if denominators.max() > 0:
            dice = np.where(denominators > 0, 2 * ctp / np.maximum(denominators, 1), 0.0)
            k = max(range(len(dice)), key=lambda i: (dice[i], THRESHOLD_CANDIDATES[i]))
            tuned, tuned_threshold = float(dice[k]), float(THRESHOLD_CANDIDATES[k])
    return {"val_pseudo_dice": 2 * tp / denominator if denominator else math.nan,
            "val_tuned_pseudo_dice": tuned, "val_tuned_threshold": tuned_threshold,
            "val_mean_dice": float(np.mean(tumour)) if tumour else math.nan,
            "val_fpv_ml": float(np.mean(empty)) if empty else math.nan,
            "val_studies": len(rows), "val_tumour_free": len(empty)}


def run_epoch(loop: Loop, mode: str, *, batches: Iterable | None = None,
              studies: list | None = None, total: int, start: int = 0,
              sums: dict | None = None, desc: str = "", threshold: float = 0.5) -> dict:
    """One pass: mode "train" steps over `batches` (resuming at `start` with the running `sums`),
    mode "val" predicts every study in `studies`. Stops early when a stop signal was seen.

    Returns {"interrupted", "done" (units finished), "sums"} plus, for train, the mean loss
    parts ("train_total", "train_bce", ...), for val the `summarise_validation` figures and a few
    previews.
    """
    training = mode == "train"
    loop.raw_model.train(training)
    sums = dict(sums or {})
    rows: list[dict] = []
    done, stopped = start, False
    units = batches if training else studies
    bar = tqdm(total=total, initial=start, desc=f"{desc} {mode}", leave=False, dynamic_ncols=True,
               disable=not runtime.is_main_process())
    for unit in units:
        if training:
            parts = train_step(loop, *unit)  # image (B, C, S, S), mask (B, 1, S, S)[, aux]
            for key, value in (parts or {}).items():
                sums[key] = sums.get(key, 0.0) + value
            sums["n"] = sums.get("n", 0) + (parts is not None)
            if parts is not None:
                bar.set_postfix(loss=f"{sums['total'] / sums['n']:.4f}")
            stop = loop.stop_agreed
        else:
            rows.append(validate_study(loop, unit, threshold))
            stop = loop.stop.signum > 0
        done += 1
        bar.update(1)
        if stop:
            stopped = True
            break
    bar.close()
    # a stop after the last training step still ends the run here (validation then pending);
    # a stop after the last validation study does not matter any more
    result = {"interrupted": stopped and (training or done < total), "done": done, "sums": sums}
    if training:
        n = max(sums.get("n", 0), 1)
        result.update({("train_loss" if k == "total" else f"train_{k}"): v / n
                       for k, v in sums.items() if k != "n"})
    else:
        result.update(summarise_validation(rows))
        result["previews"] = [(r["case_id"], r["preview"]) for r in rows if r["preview"] is not None][:3]
    return result


# ---- data ------------------------------------------------------------------------------------


def make_loader(train_set: Any, *, epoch: int, start_step: int, steps: int, batch_size: int,
                rank: int, world_size: int, num_workers: int, seed: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """The batches of one epoch. Epoch e reads items 0 .. steps*B-1 in order (the items are
    random draws already: item i of epoch e comes from rng(seed, e, i)); global batch s is items
    s*B .. s*B+B-1 and rank r takes every world_size-th of them (r, r+W, ...: DistributedSampler's
    striding without its shuffle). `start_step` skips the batches a resumed run has done.
    The loader's own generator (seeded per epoch) draws the worker seeds, so building a loader
    never consumes the global torch RNG that dropout uses."""
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(epoch)
    indices = range(start_step * batch_size + rank, steps * batch_size, world_size)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(
        train_set, batch_size=batch_size // world_size, sampler=indices, num_workers=num_workers,
        worker_init_fn=worker_init_fn, generator=generator, pin_memory=pin_memory)


# ---- set-up, checkpoint contents, resume -----------------------------------------------------


def _check_settings(train_set: Any, s: TrainSettings, world_size: int) -> int:
    """Settings that would fail late or silently; returns steps_per_epoch."""
    steps_per_epoch = s.steps_per_epoch
    if steps_per_epoch is None:
        steps_per_epoch = len(train_set) // s.batch_size
    if s.epochs < 1 or steps_per_epoch < 1 or s.batch_size < 1:
        raise TrainingError(f"epochs={s.epochs}, steps_per_epoch={steps_per_epoch}, "
                            f"batch_size={s.batch_size}: all must be >= 1")
    if s.batch_size % world_size:
        raise TrainingError(f"batch_size={s.batch_size} is the global batch and must be divisible "
                            f"by the {world_size} processes; use a multiple of {world_size}")
    if hasattr(train_set, "__len__") and len(train_set) < steps_per_epoch * s.batch_size:
        raise TrainingError(f"the training set has {len(train_set)} items per epoch but "
                            f"steps_per_epoch * batch_size = {steps_per_epoch * s.batch_size}; build "
                            "it with samples_per_epoch = steps_per_epoch * batch_size")
    return steps_per_epoch


def _gather_rng() -> list[dict]:
    """RNG states of every rank (rank r at index r); a collective call under DDP."""
    if not runtime.is_distributed():
        return [checkpoint.rng_state()]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, checkpoint.rng_state())
    return states


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on some rank (a collective call under DDP)."""
    if not runtime.is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _from_rank0(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values on every rank (decisions only rank 0 can take: it validates)."""
    if not runtime.is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


_STATE_KEYS = ("epoch", "step_in_epoch", "epoch_sums", "history", "best_key", "best_epoch",
               "stale_validations", "seconds")


def _restore(loop: Loop, ckpt: dict, path: Path, *, rank: int, world_size: int,
             steps_per_epoch: int, batch_size: int) -> LoopState:
    """Load a checkpoint into the loop; returns the run's position and bookkeeping."""
    for key, now in (("steps_per_epoch", steps_per_epoch), ("batch_size", batch_size)):
        if ckpt.get(key) != now:
            raise TrainingError(f"{path} was written with {key}={ckpt.get(key)}, this run has "
                                f"{key}={now}; resume with the run's saved config (main.py --resume)")
    try:
        loop.raw_model.load_state_dict(ckpt["model"])
        if loop.ema is not None:
            loop.ema.load_state_dict(ckpt["ema_model"])
    except RuntimeError as exc:
        raise TrainingError(f"{path} holds weights of another model ({str(exc)[:300]}...); "
                            "resume with the run's saved config") from None
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    loop.scheduler.load_state_dict(ckpt["scheduler"])
    loop.scaler.load_state_dict(ckpt["scaler"])
    loop.step, loop.nonfinite_total = ckpt["step"], ckpt["nonfinite_skipped"]
    if ckpt["world_size"] == world_size:
        checkpoint.set_rng_state(ckpt["rng_states"][rank])
    else:  # other ranks' dropout streams cannot be matched: still a valid, seeded continuation
        log.warning("%s was written by %d process(es), this run has %d: resuming, but not "
                    "bit-identically", path, ckpt["world_size"], world_size)
        checkpoint.set_rng_state(ckpt["rng_states"][0])
        torch.manual_seed(ckpt["step"] * 1000 + rank)
    log.info("resumed %s: epoch %d, step %d (%d of the epoch)", path, ckpt["epoch"] + 1,
             ckpt["step"], ckpt["step_in_epoch"])
    return LoopState(**{k: ckpt[k] for k in _STATE_KEYS})


def _checkpoint_state(loop: Loop, state: LoopState, *, rng_states: list[dict], world_size: int,
                      steps_per_epoch: int, batch_size: int, run_config: dict | None) -> dict:
    """Everything needed to continue exactly; only tensors / containers / str / numbers / None
    inside, so `torch.load(path, weights_only=True)` reads it."""
    return {
        "model": loop.raw_model.state_dict(),  # unwrapped from DDP / torch.compile
        **({"ema_model": loop.ema.state_dict()} if loop.ema is not None else {}),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        **dataclasses.asdict(state),
        "step": loop.step,
        "best_score": state.best_key[0] if state.best_key else None,
        "nonfinite_skipped": loop.nonfinite_total,
        "rng_states": rng_states,
        "world_size": world_size,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "config": run_config,
        "torch_version": str(torch.__version__),
    }


def build_loop(model: nn.Module, loss_fn: Callable, device: torch.device, stop: StopSignal,
               s: TrainSettings, total_steps: int) -> Loop:
    """Model on the device (channels_last on CUDA), optimizer over its parameters, per-iteration
    LambdaLR, GradScaler (active only for fp16), then the DDP / torch.compile wrappers."""
    amp_dtype = runtime.resolve_amp(s.amp, device)
    use_channels_last = runtime.resolve_flag(s.channels_last, device)
    raw_model = model.to(device)
    if use_channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    opt = build_optimizer(raw_model, s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
                          momentum=s.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(
        it, total_steps=total_steps, schedule=s.schedule, warmup_steps=s.warmup_steps,
        poly_power=s.poly_power))
    net: nn.Module = raw_model
    if runtime.is_distributed():
        if use_sync_bn(s.sync_bn, device, s.batch_size // dist.get_world_size()):
            net = raw_model = models.convert_sync_bn(raw_model)  # same Parameter objects
            log.info("BatchNorm -> SyncBatchNorm (%d images per process)",
                     s.batch_size // dist.get_world_size())
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if s.compile:
        net = torch.compile(net)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    validation = dict(inplane=s.inplane, img_size=s.img_size, overlap=s.patch_overlap,
                      batch_size=s.eval_batch_size, context_slices=s.context_slices,
                      amp_dtype=amp_dtype)
    ema = None
    if s.ema_decay > 0:
        ema = copy.deepcopy(raw_model).eval()
        ema.requires_grad_(False)
    return Loop(net, raw_model, loss_fn, opt, scheduler, scaler, device, amp_dtype,
                use_channels_last, s.grad_clip, s.max_nonfinite, stop, validation=validation,
                ema=ema, ema_decay=s.ema_decay)


def use_sync_bn(setting: Any, device: torch.device, per_process_batch: int) -> bool:
    """SyncBatchNorm under DDP: "auto" -> on CUDA when each process has fewer than 16 images
    (models.sync_bn_default: BatchNorm statistics of a few slices are noisy; Wu & He 2018);
    True / False force it. torch's SyncBatchNorm runs on GPUs only, so True on the CPU is refused."""
    if setting in (False, "False"):
        return False
    if device.type != "cuda":
        if setting in (True, "True"):
            raise TrainingError("--sync_bn=True needs CUDA (torch's SyncBatchNorm runs on GPUs "
                                "only); use --sync_bn=auto or False on the CPU")
        return False
    return setting in (True, "True") or models.sync_bn_default(per_process_batch)


SELECT_BY = {"pseudo_dice": "val_pseudo_dice", "tuned_pseudo_dice": "val_tuned_pseudo_dice"}


def _update_best(state: LoopState, record: dict, *, has_val: bool, validated: bool,
                 patience: int, select_by: str = "pseudo_dice") -> tuple[bool, bool]:
    """Best-checkpoint criterion: the highest validation pseudo-Dice at the run's threshold
    (select_by=pseudo_dice) or at the best threshold of that epoch (tuned_pseudo_dice); ties ->
    the lower mean FPV on tumour-free studies (NaN counts as 0 in both). Without validation
    studies the latest epoch is the best. Returns (improved, stop early: `patience` validations
    without gain)."""
    if not has_val:
        state.best_key, state.best_epoch = None, record["epoch"]
        return True, False
    if not validated:
        return False, False
    dice, fpv = record[SELECT_BY[select_by]], record["val_fpv_ml"]
    key = [dice if math.isfinite(dice) else 0.0, -fpv if math.isfinite(fpv) else 0.0]
    improved = state.best_key is None or key > state.best_key
    if improved:
        state.best_key, state.best_epoch, state.stale_validations = key, record["epoch"], 0
    else:
        state.stale_validations += 1
    return improved, patience > 0 and state.stale_validations >= patience


def _fit(loop: Loop, state: LoopState, runlog: RunLog, save: Callable[..., None], *,
         train_set: Any, val_studies: list, s: TrainSettings, steps_per_epoch: int, rank: int,
         world_size: int) -> dict:
    """The epoch loop from the position `state` on; returns how it ended."""
    start, seconds0 = time.perf_counter(), state.seconds
    outcome = {"interrupted": False, "stopped_early": False}
    for epoch in range(state.epoch, s.epochs):
        epoch_start, desc = time.perf_counter(), f"epoch {epoch + 1}/{s.epochs}"
        loader = make_loader(train_set, epoch=epoch, start_step=state.step_in_epoch,
                             steps=steps_per_epoch, batch_size=s.batch_size, rank=rank,
                             world_size=world_size, num_workers=s.num_workers, seed=s.seed,
                             pin_memory=loop.device.type == "cuda")
        train = run_epoch(loop, "train", batches=loader, total=steps_per_epoch,
                          start=state.step_in_epoch, sums=state.epoch_sums, desc=desc)
        state.step_in_epoch, state.epoch_sums = train["done"], train["sums"]
        state.seconds = seconds0 + time.perf_counter() - start
        if train["interrupted"]:
            save(state, False)
            return {**outcome, "interrupted": True}
        validated = bool(val_studies) and ((epoch + 1) % s.val_every == 0 or epoch + 1 == s.epochs)
        val, improved, early = {}, False, False
        if rank == 0:
            if validated:
                val = run_epoch(loop, "val", studies=val_studies, total=len(val_studies),
                                desc=desc, threshold=s.threshold)
            record = {"epoch": epoch + 1, "step": loop.step,
                      **{k: v for k, v in train.items() if k.startswith("train_")},
                      **{k: val.get(k) for k in ("val_pseudo_dice", "val_mean_dice", "val_fpv_ml",
                                                 "val_tuned_pseudo_dice", "val_tuned_threshold")},
                      "lr": loop.optimizer.param_groups[0]["lr"],
                      "seconds": time.perf_counter() - epoch_start,
                      "nonfinite_skipped": loop.nonfinite_total}
            if not val.get("interrupted"):
                improved, early = _update_best(state, record, has_val=bool(val_studies),
                                               validated=validated, patience=s.early_stop_patience,
                                               select_by=s.select_by)
        val_interrupted, early = _from_rank0([float(bool(val.get("interrupted"))), float(early)], loop.device)
        if val_interrupted:  # training of this epoch is done; resume re-runs its validation
            save(state, False)
            return {**outcome, "interrupted": True}
        if rank == 0:
            state.history.append(record)
        state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, {}
        state.seconds = seconds0 + time.perf_counter() - start
        save(state, improved, epoch_weights=validated and s.keep_epoch_checkpoints)
        if rank == 0:
            runlog.epoch(record, state.history, val.get("previews", []) if s.log_images else [])
            log.info(summary_line(record, s.epochs, state.best_key, state.best_epoch))
        if _any_rank(loop.stop.signum > 0, loop.device):
            return {**outcome, "interrupted": True}
        if early:
            log.info("early stop: no better validation in %d validations", s.early_stop_patience)
            return {**outcome, "stopped_early": True}
    return outcome


class Saver:
    """Writes the checkpoints of a run (rank 0; every rank calls it at the same point, since
    gathering the RNG states is a collective): last.pt always, best.pt when the epoch improved,
    and with `epoch_weights` checkpoints/epoch_<k>.pt, the weights alone (and their moving
    average), for learning curves (bench/learning_curve.py)."""

    def __init__(self, loop: Loop, run_dir: Path, *, rank: int, world_size: int,
                 steps_per_epoch: int, batch_size: int, run_config: dict | None) -> None:
        self.loop, self.folder, self.rank, self.world_size = loop, run_dir / "checkpoints", rank, world_size
        self.steps_per_epoch, self.batch_size, self.run_config = steps_per_epoch, batch_size, run_config

    def __call__(self, position: LoopState, best: bool, epoch_weights: bool = False) -> None:
        rng_states = _gather_rng()
        if self.rank != 0:
            return
        ckpt = _checkpoint_state(self.loop, position, rng_states=rng_states,
                                 world_size=self.world_size, steps_per_epoch=self.steps_per_epoch,
                                 batch_size=self.batch_size, run_config=self.run_config)
        checkpoint.save_checkpoint(ckpt, self.folder / "last.pt")
        if best:
            checkpoint.save_checkpoint(ckpt, self.folder / "best.pt")
        if epoch_weights:
            weights = {k: ckpt[k] for k in ("model", "ema_model") if k in ckpt}
            checkpoint.save_checkpoint({**weights, "epoch": position.epoch, "step": self.loop.step},
                                       self.folder / f"epoch_{position.epoch}.pt")


def train(*, model: nn.Module, loss_fn: Callable, train_set: Any, val_studies: list,
          run_dir: str | Path, device: torch.device | str, settings: TrainSettings,
          resume: bool = False, run_config: dict | None = None) -> dict:
    """Train `model` (logits (B, 1, S, S)) on `train_set` (map-style, items (image (C, S, S),
    mask (1, S, S)), `set_epoch(e)`, item i of epoch e a function of (seed, e, i), at least
    steps_per_epoch * batch_size items) and validate on whole `val_studies` (data.CachedStudy).

    `settings`: the loop's settings (TrainSettings.from_config(cfg)); `run_config`: the run's
    resolved config as a dict, stored in every checkpoint. batch_size is the global batch: under
    torchrun each of W processes takes batch_size / W. Writes into run_dir: train.log,
    metrics.jsonl, tb/, curves.png, checkpoints/{last,best}.pt (rank 0 only; with
    keep_epoch_checkpoints also epoch_<k>.pt, the weights alone after the validation of epoch
    k). `resume=True`
    continues from run_dir/checkpoints/last.pt exactly.

    Returns {"best_epoch", "best_score" (pseudo-Dice, None without validation), "epochs_run"
    (epochs completed), "steps", "seconds", "stopped_early", "interrupted", "signal" (the
    signal number that stopped the run, else 0), "nonfinite_skipped"} (figures of rank 0).
    """
    s = settings
    run_dir, device = Path(run_dir), torch.device(device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if runtime.is_distributed() else (0, 1)
    steps_per_epoch = _check_settings(train_set, s, world_size)
    last_path = run_dir / "checkpoints" / "last.pt"
    if not resume and last_path.exists():
        raise TrainingError(f"{run_dir} already holds a run ({last_path}); continue it with "
                            f"--resume={run_dir} or choose another --run_name")
    if resume and not last_path.is_file():
        raise TrainingError(f"{last_path} not found: nothing to resume; start a new run "
                            "without --resume")
    runtime.setup_logging(run_dir, rank=rank)
    runtime.seed_everything(s.seed + rank, deterministic=s.deterministic)  # ranks: different dropout
    with StopSignal() as stop:
        loop = build_loop(model, loss_fn, device, stop, s, total_steps=s.epochs * steps_per_epoch)
        state = LoopState()
        if resume:
            state = _restore(loop, checkpoint.load_checkpoint(last_path), last_path, rank=rank,
                             world_size=world_size, steps_per_epoch=steps_per_epoch,
                             batch_size=s.batch_size)
        log.info("training %s on %s (%d process(es)): %d epochs x %d steps, global batch %d, "
                 "%s, amp %s, from epoch %d step %d", type(loop.raw_model).__name__, device,
                 world_size, s.epochs, steps_per_epoch, s.batch_size, s.optimizer, loop.amp_dtype,
                 state.epoch + 1, loop.step)

        save = Saver(loop, run_dir, rank=rank, world_size=world_size,
                     steps_per_epoch=steps_per_epoch, batch_size=s.batch_size,
                     run_config=run_config)
        runlog = RunLog(run_dir, state.history, loop.step, enabled=rank == 0)
        try:
            outcome = _fit(loop, state, runlog, save, train_set=train_set, val_studies=val_studies,
                           s=s, steps_per_epoch=steps_per_epoch, rank=rank, world_size=world_size)
        except TrainingError as exc:
            log.error("training stopped: %s", exc)  # also in train.log, for the sweep's record
            raise
        finally:
            runlog.close()
    if outcome["interrupted"]:
        log.warning("stopped by signal %s at epoch %d, step %d; %s saved: continue with "
                    "python main.py --resume=%s", stop.signum or "(another rank)",
                    state.epoch + 1, loop.step, last_path, run_dir)
    runtime.barrier()
    return {"best_epoch": state.best_epoch,
            "best_score": state.best_key[0] if state.best_key else None,
            "epochs_run": state.epoch, "steps": loop.step, "seconds": state.seconds,
            **outcome, "signal": stop.signum, "nonfinite_skipped": loop.nonfinite_total}
