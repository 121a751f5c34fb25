"""Checkpoints: what a run needs to continue exactly, written atomically and read safely.

    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")    # temporary file + rename
    state = load_checkpoint(path)                                   # weights_only=True, on the CPU
    load_weights(model, path)                                       # for evaluation / prediction
    load_weights(model, paths)                                      # the mean of several (SWA)

A checkpoint holds the model / optimizer / scheduler / GradScaler states, the position in the
run (epoch, step, step in the epoch, the running loss sums of a partial epoch), the history of
epoch records, the best-checkpoint bookkeeping, every rank's RNG states and the run's config.
Only tensors, containers, strings, numbers and None go in, so `torch.load(weights_only=True)`
reads it (no pickled code is ever executed). training.py decides what goes in; this module
only writes, reads and captures the RNG states.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged or belongs to another model (a user matter)."""

    user_error = True


def rng_state() -> dict:
    """Every RNG the loop uses, as plain lists / tensors (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, *rest = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Atomic write: a temporary file in the same folder, fsync, then os.replace (a reader sees
    the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `save_checkpoint`, loaded safely (weights_only=True) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: nothing to resume; start a new run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a broken file
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}); "
                            "it is damaged or not a checkpoint of this project") from None


def epoch_files(folder: str | Path) -> dict[int, Path]:
    """{k: folder/epoch_<k>.pt} for the weights a run kept after each validation
    (keep_epoch_checkpoints), in epoch order."""
    found = {}
    for path in Path(folder).glob("epoch_*.pt"):
        suffix = path.stem.removeprefix("epoch_")
        if suffix.isdigit():
            found[int(suffix)] = path
    return dict(sorted(found.items()))


def averaged_epochs(folder: str | Path, average_from: float, epochs: int,
                    steps_per_epoch: int) -> list[Path]:
    """The `epoch_<k>.pt` files of `folder` (written after each validation with
    keep_epoch_checkpoints) whose weights were saved after the first `average_from` fraction of
    the run's epochs x steps_per_epoch steps, in epoch order: what an averaged checkpoint is the
    mean of. The run must have finished (its last epoch is always validated, so epoch_<epochs>.pt
    exists); anything else is a CheckpointError that says what to do."""
    folder = Path(folder)
    found = epoch_files(folder)
    if epochs not in found:
        raise CheckpointError(
            f"{folder} has no epoch_{epochs}.pt: an averaged checkpoint needs the weights kept "
            "after every validation (--keep_epoch_checkpoints=True) of a finished run; "
            + ("train with that setting" if not found else "resume the run to its end first"))
    first = average_from * epochs * steps_per_epoch
    return [path for k, path in found.items() if k * steps_per_epoch > first]


def average_weights(paths: list[Path]) -> dict:
    """{"model": ..., ["ema_model": ...]}: the element-wise mean of the weights of the `paths`
    (stochastic weight averaging of checkpoints, Izmailov et al., UAI 2018), accumulated in
    float64 and stored in each tensor's own dtype. BatchNorm running statistics are averaged like
    the weights; integer buffers (num_batches_tracked) are taken from the last file."""
    if not paths:
        raise CheckpointError("no checkpoint to average")
    sums: dict[str, dict] = {}
    last: dict = {}
    for path in paths:
        last = load_checkpoint(path)
        for key in ("model", "ema_model"):
            if key not in last:
                continue
            total = sums.setdefault(key, {})
            for name, value in last[key].items():
                if value.is_floating_point():
                    total[name] = total.get(name, 0) + value.double()
    return {key: {name: (total[name] / len(paths)).to(value.dtype) if value.is_floating_point()
                  else value for name, value in last[key].items()}
            for key, total in sums.items()}


def load_weights(model: torch.nn.Module, path: str | Path | list) -> torch.nn.Module:
    """Load the weights a checkpoint is evaluated with into `model`: the moving average of the
    weights when the run kept one (ema_decay > 0), else the model itself (DDP / torch.compile
    prefixes removed). A list of paths loads their mean (`average_weights`). A missing file, a
    damaged file or weights of another model is a CheckpointError."""
    if isinstance(path, list):
        ckpt, path = average_weights(path), Path(path[-1]).parent
    else:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} not found; train first (python main.py) or pick "
                                  f"--checkpoint=best|last that exists in {path.parent}")
        ckpt = load_checkpoint(path)
    state = ckpt.get("ema_model", ckpt["model"])
    # DDP / torch.compile wrappers prefix the parameter names
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the model {type(model).__name__} built from "
                              f"the run's config.json ({str(err).splitlines()[0]}); was "
                              "config.json edited?") from None
    return model
