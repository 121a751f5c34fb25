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
import sys
import time
from pathlib import Path

import torch

import config
import data
import factory
import runtime
import test
import training


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
    manifest = factory.prepare_data(cfg)
    return manifest.studies, manifest.split


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

    model = factory.build_model(cfg, pretrained=cfg.pretrained)
    loss_fn = factory.build_loss(cfg)
    train_set = factory.build_train_set(cfg, [by_id[c] for c in split["train"]])
    result = training.train(
        model=model, loss_fn=loss_fn, train_set=train_set,
        val_studies=[by_id[c] for c in split["val"]], run_dir=run_dir, device=device,
        settings=training.TrainSettings.from_config(cfg), resume=bool(cfg.resume),
        run_config=cfg.to_dict())
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
