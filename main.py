"""Train and evaluate a TransUNet for PET/CT tumour segmentation: config -> data -> model + loss
-> training.train -> test.evaluate.

    python main.py                                         # CPU: phantom, small TransUNet
    python main.py --preset=paper --data_dir=/data/autoPET --pretrained=R50+ViT-B_16.npz  # GPU
    torchrun --nproc_per_node=8 main.py --preset=paper --data_dir=/data/autoPET ...       # DDP
    python main.py --resume=runs/<name>                    # continue a stopped run exactly

Order of work, so that a mistake costs nothing: every setting is checked (values, the model
and the loss are built on the meta device) before anything is generated, read or written; a
run directory that already exists is refused before a single file is written into it (only
`--resume` continues one, with its own saved settings); then the data is found or generated,
cached and split, the run's record (config.json, split.json, cases.json) is written, and the
model trains and is evaluated.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

import config
import data
import factory
import metrics
import runtime
import test
import training
from data.prepare import check_same_data, load_manifest, save_manifest

# settings a resumed run may change: where it runs, not what it computes
RESUME_MAY_CHANGE = ("device", "num_workers")


def resume_config(argv: list[str], cfg: config.Config) -> config.Config:
    """The saved config of the run being resumed. Other settings on the command line are refused
    (listing them), except RESUME_MAY_CHANGE: a resumed run continues exactly what was started."""
    run_dir = Path(cfg.resume)
    saved = config.load_config(run_dir / "config.json")
    if not (run_dir / "checkpoints" / "last.pt").exists():
        raise config.ConfigError(f"{run_dir}/checkpoints/last.pt not found: nothing to resume; "
                                 "start a new run without --resume")
    given = config.parse_overrides(argv)
    given.pop("resume")
    keep = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    changed = sorted(k for k, v in given.items() if k not in RESUME_MAY_CHANGE
                     and getattr(saved, k) != getattr(cfg, k))
    if changed:
        listed = ", ".join(f"--{k}={getattr(cfg, k)!r} (saved: {getattr(saved, k)!r})" for k in changed)
        raise config.ConfigError(f"--resume continues {run_dir} with the settings in its "
                                 f"config.json; these differ: {listed}. Drop them, or start a "
                                 f"new run with another --run_name")
    return dataclasses.replace(saved, resume=str(run_dir), **keep)


def resolve_run_dir(cfg: config.Config) -> Path:
    """The run directory. A new run never writes into an existing directory: that is refused
    here, before any file is written. Under torchrun rank 0 decides (a default name holds its
    clock) and every rank gets its answer."""
    if cfg.resume:
        return Path(cfg.resume)
    decision: list = [None, None]  # name, error
    if runtime.is_main_process():
        name = cfg.run_name or f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.out_dir) / name
        if run_dir.exists() and any(run_dir.iterdir()):
            decision = [name, f"{run_dir} already exists and holds files of another run; nothing "
                              f"was changed in it. Continue that run with --resume={run_dir}, "
                              "or choose another --run_name"]
        else:
            decision = [name, None]
    if runtime.is_distributed():
        torch.distributed.broadcast_object_list(decision, src=0)
    if decision[1]:
        raise config.ConfigError(decision[1])
    return Path(cfg.out_dir) / decision[0]


def prepare(cfg: config.Config, run_dir: Path, rank: int) -> data.prepare.Manifest:
    """The run's data, prepared by rank 0 (the others read the finished cache). A new run
    records it; a resumed run must find exactly the data it recorded."""
    manifest = factory.prepare_data(cfg) if rank == 0 else None
    if rank == 0:
        if cfg.resume:
            recorded = load_manifest(run_dir / "cases.json")
            check_same_data(recorded, manifest.studies, [s["case_id"] for s in recorded["studies"]],
                            "run's")
        else:
            write_run_files(cfg, run_dir, manifest)
    runtime.barrier()
    return manifest if rank == 0 else factory.prepare_data(cfg)


def write_run_files(cfg: config.Config, run_dir: Path, manifest: data.prepare.Manifest) -> None:
    config.save_config(cfg, run_dir / "config.json", extra={"environment": runtime.environment_facts()})
    data.save_split(manifest.split, run_dir / "split.json")
    save_manifest(manifest, run_dir / "cases.json")


def main(argv: list[str]) -> dict:
    cfg = config.parse_cli(argv)
    if cfg.resume:
        cfg = resume_config(argv, cfg)
    factory.check_settings(cfg)
    rank, world_size, device = runtime.distributed_setup(cfg.device)
    if cfg.batch_size % world_size:
        raise config.ConfigError(f"--batch_size={cfg.batch_size} is the global batch and must be "
                                 f"divisible by the {world_size} processes")
    runtime.resolve_amp(cfg.amp, device)  # --amp=fp16 / True on a CPU: refused before any work
    run_dir = resolve_run_dir(cfg)
    runtime.setup_logging(run_dir, rank=rank)
    runtime.seed_everything(cfg.seed, deterministic=cfg.deterministic)
    manifest = prepare(cfg, run_dir, rank)
    if cfg.tune_postprocess:  # what the evaluation will choose by, checked before training
        test.check_tuning_studies(cfg.pp_objective, [len(s.fg_slices) > 0 for s in
                                                     manifest.subset("val")], "the validation studies")

    model = factory.build_model(cfg, pretrained=cfg.pretrained)
    loss_fn = factory.build_loss(cfg)
    train_set = factory.build_train_set(cfg, manifest.subset("train"))
    result = training.train(
        model=model, loss_fn=loss_fn, train_set=train_set, val_studies=manifest.subset("val"),
        run_dir=run_dir, device=device, settings=training.TrainSettings.from_config(cfg),
        resume=bool(cfg.resume), run_config=cfg.to_dict())
    summary = {}
    if rank == 0 and not result.get("interrupted"):
        summary = test.evaluate(run_dir, device=device)
        print(metrics.format_summary(summary))
        print(f"run directory: {run_dir}")
    runtime.distributed_cleanup()
    return {"train": result, "eval": summary, "run_dir": str(run_dir)}


if __name__ == "__main__":
    with runtime.exit_on_user_error():
        outcome = main(sys.argv[1:])
    sys.exit(3 if outcome["train"].get("interrupted") else 0)
