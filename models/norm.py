"""Cross-GPU BatchNorm for DDP: `convert_sync_bn(model)` and the rule `sync_bn_default`.

    from models import convert_sync_bn, sync_bn_default
    if world_size > 1 and sync_bn_default(per_gpu_batch):
        model = convert_sync_bn(model)  # before wrapping in DistributedDataParallel

BatchNorm normalises with the statistics of the batch on one GPU. Wu & He (2018, "Group
Normalization", ECCV, arXiv:1803.08494, Fig. 1) report ResNet-50 ImageNet top-1 error with BN
of 23.6 / 23.7 / 24.8 / 27.3 / 34.7 % at 32 / 16 / 8 / 4 / 2 images per GPU ("BN's error
increases rapidly when the batch size becomes smaller, caused by inaccurate batch statistics
estimation"), flat down to 16 and worse from 8. The paper preset's 24 slices split over 8 GPUs
leaves 3 per GPU, where statistics of 3 (highly correlated) slices are noisy; SyncBatchNorm
computes them over the global batch instead, at the price of one all-reduce per BN layer.
TransUNet's encoder uses GroupNorm (batch-independent; untouched), only its CUP decoder has
BatchNorm (9 layers); the smp baselines are BatchNorm throughout.
"""
from __future__ import annotations

import torch.nn as nn

SYNC_BN_BELOW = 16  # per-GPU batch under which BN statistics degrade (Wu & He 2018, Fig. 1)


def sync_bn_default(per_gpu_batch: int, *, threshold: int = SYNC_BN_BELOW) -> bool:
    """True when the per-GPU batch is below `threshold` (16): use SyncBatchNorm under DDP.

    Only meaningful with more than one process: with one GPU, SyncBatchNorm equals BatchNorm
    and torch refuses to run it without an initialised process group.
    """
    if per_gpu_batch < 1:
        raise ValueError(f"per_gpu_batch={per_gpu_batch}: must be >= 1 (batch_size / world size)")
    return per_gpu_batch < threshold


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Every BatchNorm*d of `model` replaced by nn.SyncBatchNorm with the same parameters and
    running statistics (torch's `nn.SyncBatchNorm.convert_sync_batchnorm`); GroupNorm,
    LayerNorm and the rest untouched. Returns the converted module (the root itself is
    replaced if it is a BatchNorm); call before DistributedDataParallel and after `.to(device)`
    or before, as convenient. Forward of a SyncBatchNorm in training needs the process group.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
