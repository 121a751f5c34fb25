"""Comparison architectures from segmentation_models_pytorch, by name `<arch>_<encoder>`.

`unet_resnet34` -> smp.Unet("resnet34", encoder_weights=None, in_channels, classes); any smp
architecture (unet, unetplusplus, manet, linknet, fpn, pspnet, deeplabv3, deeplabv3plus, pan,
upernet, segformer, dpt) with any smp encoder name. Weights are never downloaded
(encoder_weights=None); a local state_dict can be loaded with `pretrained=path`.
"""
from __future__ import annotations

import inspect

import segmentation_models_pytorch as smp
import torch.nn as nn

# The names the study compares; `build_baseline` accepts any other valid combination too.
BASELINES = (
    "unet_resnet18", "unet_resnet34", "unet_resnet50", "unetplusplus_resnet34", "manet_resnet34",
    "fpn_resnet34", "deeplabv3plus_resnet34", "segformer_mit_b0",
)
# Arguments build_baseline sets itself; options may not override them.
_RESERVED = {"self", "encoder_name", "encoder_weights", "in_channels", "classes", "activation", "kwargs"}


def parse_baseline_name(name: str) -> tuple[type[nn.Module], str]:
    """"deeplabv3plus_resnet34" -> (smp.DeepLabV3Plus, "resnet34"); ValueError if unknown."""
    arch, _, encoder = name.partition("_")
    architectures = smp.MODEL_ARCHITECTURES_MAPPING
    if arch not in architectures or not encoder:
        raise ValueError(f"unknown model '{name}': smp baselines are named <arch>_<encoder> with "
                         f"arch in {sorted(architectures)}, e.g. unet_resnet34")
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders and not encoder.startswith("tu-"):
        raise ValueError(f"unknown encoder '{encoder}' in model '{name}'; smp encoders include "
                         f"{', '.join(sorted(encoders)[:12])}, ... (smp.encoders.get_encoder_names())")
    return architectures[arch], encoder


def baseline_options(cls: type[nn.Module]) -> list[str]:
    """Keyword options of an smp architecture that build_model passes through."""
    params = inspect.signature(cls.__init__).parameters
    return sorted(set(params) - _RESERVED) + ["grad_checkpointing"]


def build_baseline(name: str, in_channels: int, num_classes: int, img_size: int, **options) -> nn.Module:
    """An smp model returning logits (B, num_classes, S, S); S must be a multiple of 32."""
    cls, encoder = parse_baseline_name(name)
    if img_size % 32:
        raise ValueError(f"img_size={img_size}: {name} downsamples 32x, so img_size must be a "
                         "multiple of 32 (e.g. 128, 224, 256)")
    accepted = baseline_options(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name}; accepted: {accepted}")
    if options.pop("grad_checkpointing", False):
        raise ValueError(f"grad_checkpointing is only implemented for transunet_* models, not {name}")
    return cls(encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
               classes=num_classes, activation=None, **options)
