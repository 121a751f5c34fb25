"""Train and evaluate a TransUNet for PET/CT tumour segmentation: config -> data -> model + loss
-> training.train -> test.evaluate.

    python main.py                                         # CPU: phantom, small TransUNet, ~10 min
    python main.py --preset=paper --data_dir=/data/autoPET # GPU: R50-ViT-B_16, published loss
    torchrun --nproc_per_node=8 main.py --preset=paper --data_dir=/data/autoPET   # DDP
    python main.py --resume=runs/<name>                    # continue a stopped run exactly
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

import config
import data
import models
import runtime
import test
import training
from data.phantom import generate as generate_phantom
from loss import CombinedLoss


def resolve_run(cfg: config.Config) -> tuple[config.Config, Path]:
    """A new run directory, or the saved config of the run being resumed (it wins). Under
    torchrun every rank gets rank 0's directory (a default name holds rank 0's clock)."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = config.load_config(run_dir / "config.json")
        if not (run_dir / "checkpoints" / "last.pt").exists():
            raise config.ConfigError(f"{run_dir}/checkpoints/last.pt not found: nothing to resume; "
                                     "start a new run without --resume")
        return dataclasses.replace(saved, resume=str(run_dir)), run_dir
    name = [cfg.run_name or f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if runtime.is_distributed():
        torch.distributed.broadcast_object_list(name, src=0)
    return cfg, Path(cfg.out_dir) / name[0]


def prepare_studies(cfg: config.Config) -> tuple[list, dict]:
    """Find (or generate) studies, preprocess them once into the cache, split by patient."""
    data_dir = cfg.data_dir
    if data_dir is None:  # the built-in phantom, generated once and reused
        data_dir = str(Path(cfg.cache_dir) / "phantom" /
                       f"{cfg.phantom_size}-seed{cfg.phantom_seed}-n{cfg.phantom_cases}")
        generate_phantom(data_dir, cfg.phantom_cases, size=cfg.phantom_size, seed=cfg.phantom_seed,
                         workers=min(8, os.cpu_count() or 1))
    studies = test.cache_studies(cfg, data_dir)
    split = data.split_cases(studies, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.split_seed,
                             n_folds=cfg.n_folds, fold=cfg.fold)
    return studies, split


def write_run_files(cfg: config.Config, run_dir: Path, studies: list, split: dict) -> None:
    config.save_config(cfg, run_dir / "config.json", extra={"environment": runtime.environment_facts()})
    data.save_split(split, run_dir / "split.json")
    (run_dir / "cases.json").write_text(json.dumps([str(s.directory) for s in studies], indent=1))


def main(argv: list[str]) -> dict:
    cfg = config.parse_cli(argv)
    rank, world_size, device = runtime.distributed_setup(cfg.device)
    cfg, run_dir = resolve_run(cfg)
    runtime.setup_logging(run_dir, rank=rank)
    runtime.seed_everything(cfg.seed, deterministic=cfg.deterministic)
    if rank == 0:
        studies, split = prepare_studies(cfg)
        if not cfg.resume:
            write_run_files(cfg, run_dir, studies, split)
    runtime.barrier()
    if rank != 0:  # the cache is ready: every rank reads the same split
        studies, split = prepare_studies(cfg)
    by_id = {s.case_id: s for s in studies}

    options = dict(n_skip=cfg.n_skip, grad_checkpointing=cfg.grad_checkpointing) \
        if cfg.model.startswith("transunet") else {}
    model = models.build_model(cfg.model, in_channels=cfg.in_channels, num_classes=1,
                               img_size=cfg.img_size, pretrained=cfg.pretrained, **options)
    loss_fn = CombinedLoss(w_bce=cfg.w_bce, w_tversky=cfg.w_tversky, w_dice=cfg.w_dice,
                           alpha=cfg.tversky_fp_weight, beta=cfg.tversky_fn_weight,
                           gamma=cfg.tversky_gamma, weighting=cfg.tversky_weighting,
                           dice_log=cfg.dice_log, pos_weight=cfg.bce_pos_weight,
                           reduction=cfg.loss_reduction)
    train_set = data.PetCtSliceDataset(
        [by_id[c] for c in split["train"]], img_size=cfg.img_size, fg_fraction=cfg.fg_fraction,
        augment=cfg.augment, context_slices=cfg.context_slices,
        samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size, seed=cfg.seed)
    result = training.train(
        model=model, loss_fn=loss_fn, train_set=train_set,
        val_studies=[by_id[c] for c in split["val"]], run_dir=run_dir, device=device,
        epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, batch_size=cfg.batch_size,
        optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, poly_power=cfg.poly_power,
        grad_clip=cfg.grad_clip, amp=cfg.amp, channels_last=cfg.channels_last,
        compile=cfg.compile, num_workers=cfg.num_workers, val_every=cfg.val_every,
        early_stop_patience=cfg.early_stop_patience, max_nonfinite=cfg.max_nonfinite,
        seed=cfg.seed, deterministic=cfg.deterministic, resume=bool(cfg.resume),
        config_dict=cfg.to_dict(), img_size=cfg.img_size, context_slices=cfg.context_slices,
        val_batch_size=cfg.eval_batch_size, threshold=cfg.threshold)
    summary = {}
    if rank == 0 and not result.get("interrupted"):
        summary = test.evaluate(run_dir, device=device)
        print(test.format_summary(summary))
        print(f"run directory: {run_dir}")
    runtime.distributed_cleanup()
    return {"train": result, "eval": summary, "run_dir": str(run_dir)}


if __name__ == "__main__":
    with runtime.exit_on_user_error():
        outcome = main(sys.argv[1:])
    sys.exit(3 if outcome["train"].get("interrupted") else 0)
