"""Do a run's evaluated weights gain from BatchNorm statistics re-estimated on training batches?

    python bench/precise_bn.py --run_dir=runs/<name> [--checkpoint=best] [--batches=N] [--cache_dir=cache]

The decoder of the TransUNet (its CUP blocks) normalises with BatchNorm. In training the running
mean and variance are an exponential moving average (momentum 0.1) over the last batches of
the weights of those steps; the weights a run is evaluated with are either one epoch's (the
validation-chosen `best`) or, with `average_from`, the mean of several epochs' weights, whose
BatchNorm statistics are then the mean of those epochs' statistics
(`checkpoint.average_weights`), not the statistics of the averaged weights. Izmailov et al.
("Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018, section 3.2)
recompute them for the averaged weights with one forward pass over the training data
(`torch.optim.swa_utils.update_bn`); Wu and Johnson ("Rethinking 'Batch' in BatchNorm", 2021,
section 3) show that even for one set of weights the moving average lags behind the weights
and that statistics re-estimated with the weights fixed ("precise BN") are more accurate.

This script measures that on a finished run, changing nothing in it but adding one file:
  1. the weights of `--checkpoint` (default: the run's own, `best` or `average<F>`) are loaded
     as test.py loads them;
  2. their BatchNorm statistics are re-estimated by `update_bn` (reset, then a cumulative
     average over the batches) from `--batches` training batches (default: one epoch of the
     run, steps_per_epoch batches of batch_size slices), drawn by the run's own training set
     (same sampling, foreground share and augmentation, seed = the run's) for the epoch after
     its last (epoch index = epochs, never drawn in training), under the run's autocast dtype;
  3. the result is saved as `checkpoints/bn<N>-<checkpoint>.pt` (a new file; an existing one
     is reused when its statistics are the same, refused otherwise) and evaluated by
     `test.evaluate` exactly as the run's own evaluation (threshold and post-processing chosen
     on the validation studies for these weights, TTA as the run), into
     `eval-bn<N>-<checkpoint>/`.
Nothing else of the run is touched; `python test.py` does not read the new file unless asked.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import factory  # noqa: E402
import runtime  # noqa: E402
import test as evaluation  # noqa: E402


def bn_modules(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def reestimate(model: torch.nn.Module, cfg, studies: list, batches: int,
               amp_dtype: torch.dtype | None) -> None:
    """Re-estimate `model`'s BatchNorm running statistics in place from `batches` training
    batches of the run's own training set, drawn for epoch index `cfg.epochs`; the model is
    left in eval mode."""
    train_set = factory.build_train_set(cfg, studies)
    train_set.set_epoch(cfg.epochs)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=0)
    # update_bn forwards the first element of each (image, mask[, aux]) batch; it builds no
    # graph worth keeping, so no autograd
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
        update_bn(itertools.islice(loader, batches), model)
    model.eval()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--checkpoint", default=None,
                        help="best | last | average<F> (default: the run's own)")
    parser.add_argument("--batches", type=int, default=0,
                        help="training batches to re-estimate from (default: one epoch of the run)")
    parser.add_argument("--cache_dir", default=None, help="where the studies are prepared "
                        "(test.py --cache_dir): for a run kept by bench/main_run.py")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        raise SystemExit(f"{run_dir}/config.json not found: pass --run_dir=runs/<name> of a finished run")
    cfg = evaluation.run_config(run_dir, args.cache_dir)
    source = args.checkpoint or evaluation.own_checkpoint(cfg)
    batches = args.batches or cfg.steps_per_epoch
    if batches < 1:
        raise SystemExit(f"--batches={args.batches} must be >= 1")
    device = torch.device("cpu")
    model = evaluation.load_run_model(run_dir, cfg, source, device)
    if not bn_modules(model):
        raise SystemExit(f"{cfg.model} has no BatchNorm layer: nothing to re-estimate")
    amp_dtype = runtime.resolve_amp(cfg.amp, device)
    studies = evaluation.run_studies(run_dir, cfg, "train")
    reestimate(model, cfg, studies, batches, amp_dtype)
    name = f"bn{batches}-{source}"
    path = run_dir / "checkpoints" / f"{name}.pt"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path.exists():
        earlier = checkpoint.load_checkpoint(path)["model"]
        if earlier.keys() != state.keys() or any(not torch.equal(earlier[k], state[k]) for k in state):
            raise SystemExit(f"{path} exists with other weights; move it away to re-estimate again")
    else:
        checkpoint.save_checkpoint({"model": state, "bn_reestimated": {
            "from": source, "batches": batches, "epoch_index": cfg.epochs,
            "git_commit": runtime.git_commit()}}, path)
    summary = evaluation.evaluate(run_dir, checkpoint=name, cache_dir=args.cache_dir,
                                  progress=False)
    scored = summary.get("postprocessed", summary)
    print(json.dumps({"run_dir": str(run_dir), "checkpoint": name,
                      "output_dir": summary["output_dir"], "status": summary["status"],
                      "dice": scored["metrics"]["dice"]["mean"],
                      "fpv_ml_tumor_free": scored["metrics"]["fpv_ml_tumor_free"]["mean"],
                      "lesion_recall": scored["lesions"]["recall"]}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
