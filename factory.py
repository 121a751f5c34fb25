"""The parts of an experiment built from its resolved Config, in one place: data, model, loss,
training set. main.py (training), test.py (evaluation) and sweep.py use these, so a run is
rebuilt for evaluation exactly as it was built for training.

    cfg = config.parse_cli(["--preset=tiny"])
    manifest = factory.prepare_data(cfg)          # data.Manifest: studies + split
    model = factory.build_model(cfg)              # logits (B, 1, S, S)
    loss_fn = factory.build_loss(cfg)

The packages (`data/`, `models/`, `loss.py`) take explicit keyword arguments and never see a
Config; this module is where Config fields become those arguments.
"""
from __future__ import annotations

import os
from typing import Optional

import torch.nn as nn

import config
import data
import models
from loss import AuxSegLoss, CombinedLoss, WithAuxiliary


def model_options(cfg: config.Config) -> dict:
    """Model-specific build options from the config (TransUNet only has these settings)."""
    if cfg.model.startswith("transunet"):
        return dict(n_skip=cfg.n_skip, grad_checkpointing=cfg.grad_checkpointing)
    return {}


def aux_classes(cfg: config.Config) -> int:
    """Classes of the auxiliary head: 0 (none), the organ labels, or 2 (uptake / not)."""
    return {"none": 0, "organs": cfg.n_organ_classes, "uptake": 2}[cfg.aux_target]


def build_model(cfg: config.Config, pretrained: Optional[str] = None) -> nn.Module:
    """The run's model: lesion logits (B, 1, S, S) in eval mode; in train mode with an auxiliary
    target (B, 1 + K, S, S). `pretrained`: a local weight file, or None / "none" (from scratch)."""
    if pretrained is not None and pretrained.lower() == "none":
        pretrained = None
    return models.build_model(cfg.model, in_channels=cfg.in_channels, num_classes=1,
                              img_size=cfg.img_size, pretrained=pretrained,
                              aux_classes=aux_classes(cfg), **model_options(cfg))


def check_settings(cfg: config.Config) -> None:
    """Fail now, with the setting named, for what only building can tell: the model name and
    its options (on the meta device: no memory, no weights read) and the loss settings. Called
    before any data is generated, read or cached."""
    import torch

    def build() -> None:
        models.build_model(cfg.model, in_channels=cfg.in_channels, num_classes=1,
                           img_size=cfg.img_size, aux_classes=aux_classes(cfg),
                           **model_options(cfg))

    try:
        try:
            with torch.device("meta"):
                build()
        except (RuntimeError, NotImplementedError):  # a model whose init reads tensor values
            build()
    except ValueError as err:
        raise config.ConfigError(f"--model={cfg.model}: {err}") from None
    try:
        build_loss(cfg)
    except ValueError as err:
        raise config.ConfigError(f"loss settings: {err}") from None


def build_loss(cfg: config.Config) -> nn.Module:
    lesion = CombinedLoss(w_bce=cfg.w_bce, w_tversky=cfg.w_tversky, w_dice=cfg.w_dice,
                          alpha=cfg.tversky_fp_weight, beta=cfg.tversky_fn_weight,
                          gamma=cfg.tversky_gamma, weighting=cfg.tversky_weighting,
                          dice_log=cfg.dice_log, pos_weight=cfg.bce_pos_weight,
                          reduction=cfg.loss_reduction)
    if cfg.aux_target == "none":
        return lesion
    return WithAuxiliary(lesion, AuxSegLoss(aux_classes(cfg)), w_aux=cfg.w_aux)


def build_train_set(cfg: config.Config, studies: list) -> "data.PetCtSliceDataset":
    return data.PetCtSliceDataset(
        studies, img_size=cfg.img_size, fg_fraction=cfg.fg_fraction, augment=cfg.augment,
        context_slices=cfg.context_slices, samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size,
        seed=cfg.seed, aux_target=cfg.aux_target, aux_classes=aux_classes(cfg) or None,
        uptake_suv=cfg.uptake_suv, suv_max=cfg.suv_max, p_misalign=cfg.p_misalign,
        inplane=cfg.inplane, fg_sampling=cfg.fg_sampling, hot_fraction=cfg.hot_fraction)


def inference_options(cfg: config.Config) -> dict:
    """The keyword arguments of `inference.predict_study` that come from the run's config: the
    same in-plane path (resize: whole slices resized to img_size; patch: sliding-window tiles of
    img_size at the cached resolution, `patch_overlap`) for validation, evaluation, threshold
    tuning and prediction. The caller adds device, amp_dtype and tta."""
    return dict(inplane=cfg.inplane, img_size=cfg.img_size, overlap=cfg.patch_overlap,
                batch_size=cfg.eval_batch_size, context_slices=cfg.context_slices)


def _data_kwargs(cfg: config.Config) -> dict:
    return dict(cache_dir=cfg.cache_dir, layout=cfg.layout, ct_channel=cfg.ct_channel,
                pet_channel=cfg.pet_channel, ct_window=cfg.ct_window, suv_max=cfg.suv_max,
                resample=cfg.resample, target_spacing=cfg.target_spacing)


def prepare_data(cfg: config.Config) -> "data.prepare.Manifest":
    """The run's data: cfg.data_dir (or the phantom) found, cached and split."""
    from data.prepare import prepare_data as prepare

    return prepare(data_dir=cfg.data_dir, phantom_cases=cfg.phantom_cases,
                   phantom_size=cfg.phantom_size, phantom_seed=cfg.phantom_seed,
                   phantom_test_seed=cfg.phantom_test_seed, n_val=cfg.n_val,
                   n_test=cfg.n_test, split_seed=cfg.split_seed, n_folds=cfg.n_folds,
                   fold=cfg.fold, **_data_kwargs(cfg))


def cache_folder(cfg: config.Config, data_dir: str | os.PathLike,
                 require_mask: bool = True) -> list:
    """Every study of another folder, preprocessed with the run's settings (no split)."""
    from data.prepare import cache_studies

    return cache_studies(data_dir, require_mask=require_mask, **_data_kwargs(cfg))
