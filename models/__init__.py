"""Model registry: `build_model(name, in_channels, num_classes, img_size, pretrained, **options)`.

    from models import build_model, list_models
    model = build_model("transunet_small", in_channels=2, num_classes=1, img_size=128)
    logits = model(x)  # (B, 2, 128, 128) -> (B, 1, 128, 128)

    model = build_model("transunet_small", img_size=128, aux_classes=16)   # + organ head
    model.train(); model(x)  # (B, 1 + 16, 128, 128): lesion logits, then the aux logits
    model.eval();  model(x)  # (B, 1, 128, 128): lesion logits only (models/aux.py)

Imports torch, timm, smp and numpy only (never data/, loss or config). Details in docs/models.md.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .aux import AuxHead, attach_smp_aux_head, aux_outputs, check_aux_classes
from .baselines import BASELINES, build_baseline
from .norm import convert_sync_bn, sync_bn_default
from .transunet import OPTIONS, SPECS, TransUNet, TransUNetSpec
from .weights import WeightsError, load_pretrained

__all__ = ["build_model", "list_models", "WeightsError", "TransUNet", "TransUNetSpec", "AuxHead",
           "aux_outputs", "convert_sync_bn", "sync_bn_default"]


def list_models() -> list[str]:
    """Names build_model accepts (smp baselines beyond these: any `<arch>_<encoder>`)."""
    return [*SPECS, *BASELINES]


def build_model(name: str, in_channels: int = 2, num_classes: int = 1, img_size: int = 224,
                pretrained: str | Path | None = None, aux_classes: int = 0, **options) -> nn.Module:
    """Build a segmentation model returning logits (B, num_classes, S, S) for (B, in_channels, S, S).

    aux_classes: 0 (default) or K >= 2: a second head (organ / uptake classes) on the shared
        decoder output, used in training only. model.train(): forward returns
        (B, num_classes + K, S, S), lesion logits first; model.eval(): (B, num_classes, S, S),
        unchanged by the head (models/aux.py, docs/models.md).

    name: a `transunet_*` variant (see SPECS) or an smp baseline `<arch>_<encoder>`.
    pretrained: None (from scratch, the default) or a local weights file: Google's .npz
        (transunet_* only) or a torch state_dict; see models/weights.py. Never downloads.
    options: TransUNet: n_skip, dropout, attn_dropout, drop_path, grad_checkpointing;
        smp: the architecture's keyword arguments (e.g. decoder_channels). Unknown -> ValueError.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels={in_channels}, num_classes={num_classes}: both must be >= 1")
    check_aux_classes(aux_classes)
    if name in SPECS:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            accepted = "\n  ".join(f"{k}: {v}" for k, v in OPTIONS.items())
            raise ValueError(f"unknown option(s) {unknown} for {name}; accepted:\n  {accepted}")
        model = TransUNet(SPECS[name], in_channels=in_channels, num_classes=num_classes,
                          img_size=img_size, name=name, aux_classes=aux_classes, **options)
    elif name.startswith("transunet"):
        raise ValueError(f"unknown model '{name}'; TransUNet variants: {list(SPECS)}")
    else:
        model = build_baseline(name, in_channels, num_classes, img_size, **options)
        if aux_classes:
            attach_smp_aux_head(model, aux_classes, name)
    if pretrained is not None:
        load_pretrained(model, pretrained, model_name=name)
    return model
