"""Auxiliary output head on the shared decoder (organ / uptake classes), used in training only.

Idea (LesionTracer, the autoPET III winner: Rokuss et al. 2024, arXiv:2409.09478): one shared
decoder, a second output head that segments organs, its loss added to the lesion loss, the head
dropped at inference. Here the head is one Conv3x3 on the decoder's last feature map, like the
lesion head beside it.

Output contract of a model built with aux_classes = K > 0:
    model.train():  forward(x) -> (B, num_classes + K, S, S): the lesion logits first (channel 0
                    for num_classes = 1), then the K aux logits. The aux head runs inside
                    forward, so DistributedDataParallel (which only sees forward) finds a
                    gradient for every parameter.
    model.eval():   forward(x) -> (B, num_classes, S, S), the lesion logits only, identical to a
                    model without the head that has the same shared weights: validation,
                    evaluation, prediction and ONNX export do not change.
    with aux_outputs(model): forward(x) -> (B, num_classes + K, S, S) in eval mode as well, for
                    an analysis that reads the head at inference (bench/component_filters.py);
                    nothing else does.

smp models: the head reads the input of the model's `segmentation_head` (the decoder output)
through a forward hook on that module and appends its logits to the head's output; smp's own
forward, its state_dict keys and checkpoints stay as they are (the head adds `aux_head.*`).
Where the decoder output is coarser than the input (FPN, DeepLabV3+, SegFormer, PSPNet, ...:
1/4 or 1/8) the aux logits are upsampled bilinearly, as smp's SegmentationHead does.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class AuxHead(nn.Conv2d):
    """Conv3x3 (decoder channels -> aux_classes, padding 1) -> aux logits.

    forward(features (B, C, h, w), size=(S, S) or None) -> (B, aux_classes, S, S): bilinearly
    upsampled (align_corners=True, as smp's SegmentationHead) when (h, w) differs from `size`.
    A Conv2d subclass, so its state_dict keys are just `weight` and `bias`.
    """

    def __init__(self, in_channels: int, aux_classes: int):
        super().__init__(in_channels, aux_classes, kernel_size=3, padding=1)
        self.in_eval = False  # set by aux_outputs(): append the aux logits in eval mode too

    @property
    def active(self) -> bool:
        """Whether the model's forward appends this head's logits: in training, or inside
        aux_outputs()."""
        return self.training or self.in_eval

    def forward(self, features: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        logits = super().forward(features)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
        return logits


def check_aux_classes(aux_classes: int) -> int:
    """0 (no head) or >= 2 (softmax classes); anything else is a ValueError."""
    if aux_classes != 0 and aux_classes < 2:
        raise ValueError(f"aux_classes={aux_classes}: use 0 (no auxiliary head) or the number of "
                         "auxiliary classes, >= 2 (background included)")
    return int(aux_classes)


def _append_aux_logits(aux_head: AuxHead, head: nn.Module, args: tuple, output: torch.Tensor):
    """Forward hook of an smp segmentation_head: in training, cat the aux logits computed from
    the head's input (the decoder output) to its output along channels."""
    if not aux_head.active:
        return output
    aux = aux_head(args[0], output.shape[-2:])
    return torch.cat([output, aux.to(output.dtype)], dim=1)


@contextlib.contextmanager
def aux_outputs(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` (built with aux_classes = K > 0) returns the lesion logits and
    then the K aux logits in eval mode too, (B, num_classes + K, S, S), as in training; on exit
    (also on an error) it returns the lesion logits alone again. A model without the head is a
    ValueError naming the fix."""
    head = getattr(model, "aux_head", None)
    if not isinstance(head, AuxHead):
        raise ValueError(f"{type(model).__name__} has no auxiliary head: it was built with "
                         "aux_classes=0 (train with --aux_target=organs or uptake)")
    head.in_eval = True
    try:
        yield model
    finally:
        head.in_eval = False


def attach_smp_aux_head(model: nn.Module, aux_classes: int, name: str) -> nn.Module:
    """Give an smp SegmentationModel an `aux_head` on its decoder output (module docstring)."""
    head = getattr(model, "segmentation_head", None)
    conv = next((m for m in head.modules() if isinstance(m, nn.Conv2d)), None) if head is not None else None
    if conv is None:
        raise ValueError(f"{name}: no segmentation_head with a Conv2d to read the decoder channels "
                         "from; aux_classes > 0 is not supported for this architecture")
    model.aux_head = AuxHead(conv.in_channels, aux_classes)
    head.register_forward_hook(partial(_append_aux_logits, model.aux_head))
    return model
