"""What a training run writes for people and tools, on rank 0: `metrics.jsonl` (one JSON object
per epoch), TensorBoard scalars and validation previews (`tb/`), `curves.png`, and the
one-line epoch summary that goes to the log (train.log is set up by runtime.setup_logging).

    runlog = RunLog(run_dir, history, step, enabled=rank == 0)
    runlog.epoch(record, history, previews)        # after every epoch
    runlog.close()
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

# logged beside "total" when loss_fn.parts() gives them ("aux": the auxiliary head's CE + Dice)
LOSS_PARTS = ("bce", "tversky", "dice", "aux")


def _jsonable(record: dict) -> dict:
    """NaN -> None so metrics.jsonl is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def plot_curves(history: list[dict], path: Path) -> None:
    """curves.png: training loss and its parts, validation Dice, against the epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_dice = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.2)
    epochs = [r["epoch"] for r in history]
    for key in ("train_loss", *(f"train_{k}" for k in LOSS_PARTS)):
        if any(r.get(key) is not None for r in history):
            ax_loss.plot(epochs, [r.get(key) or math.nan for r in history], label=key[6:])
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_loss.legend()
    for key, label in (("val_pseudo_dice", "pseudo-Dice"), ("val_mean_dice", "mean per-study Dice")):
        points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if points:
            ax_dice.plot(*zip(*points), "o-", label=label)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation", ylim=(0, 1))
    if ax_dice.lines:
        ax_dice.legend()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=80, format="png")
    os.replace(tmp, path)


class RunLog:
    """metrics.jsonl, TensorBoard (tb/) and curves.png, written by rank 0 only. On resume the
    files are rebuilt from the checkpoint's history, so epochs finished after the saved state
    (a crash between two saves) do not appear twice."""

    def __init__(self, run_dir: Path, history: list[dict], step: int, enabled: bool) -> None:
        self.enabled, self.run_dir = enabled, run_dir
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import, only where it writes

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in history))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=step or None)

    def epoch(self, record: dict, history: list[dict], previews: list) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and math.isfinite(value) and key not in ("epoch", "step"):
                self.tb.add_scalar(key.replace("_", "/", 1), value, record["step"])
        for case_id, preview in previews:  # (3, X, Y): PET | ground truth | prediction
            strip = np.concatenate([p.T for p in preview], axis=1)[None]  # (1, Y, 3X), axial view
            self.tb.add_image(f"val/{case_id}", strip, record["step"], dataformats="CHW")
        self.tb.flush()
        plot_curves(history, self.run_dir / "curves.png")

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def summary_line(record: dict, epochs: int, best_key: list | None, best_epoch: int) -> str:
    parts = " ".join(f"{k} {record[f'train_{k}']:.4f}" for k in LOSS_PARTS if f"train_{k}" in record)
    line = (f"epoch {record['epoch']}/{epochs} step {record['step']} | loss "
            f"{record['train_loss']:.4f}" + (f" ({parts})" if parts else ""))
    if record.get("val_pseudo_dice") is not None:
        line += (f" | val pseudo-Dice {record['val_pseudo_dice']:.4f}, mean Dice "
                 f"{record['val_mean_dice']:.4f}, FPV {record['val_fpv_ml']:.2f} ml")
        if record.get("val_tuned_pseudo_dice") is not None:
            line += (f", tuned pseudo-Dice {record['val_tuned_pseudo_dice']:.4f} at "
                     f"{record['val_tuned_threshold']:.2f}")
    line += f" | lr {record['lr']:.2e} | {record['seconds']:.1f} s"
    if record["nonfinite_skipped"]:
        line += f" | {record['nonfinite_skipped']} non-finite steps skipped"
    if best_key is not None:
        line += f" | best {best_key[0]:.4f} (epoch {best_epoch})"
    return line
