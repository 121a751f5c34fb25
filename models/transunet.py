"""TransUNet (Chen et al. 2021, arXiv:2102.04306) for 2-channel PET/CT, any size divisible by 16.

    encoder: ResNet-V2 stages (StdConv + GroupNorm, timm's `ResNetV2`) -> 1x1 patch embedding on the
             1/16 grid -> learned position embedding (no class token) -> pre-LN ViT blocks -> LN
             (timm's `VisionTransformer` / `HybridEmbed`, the same classes as timm's
             `vit_base_r50_s16_224`, which is the paper's R50-ViT-B_16 encoder)
    decoder: "CUP" (cascaded upsampler), written here: Conv3x3-BN-ReLU embed_dim -> head_channels,
             then four blocks of bilinear x2 + concat skip + 2x Conv3x3-BN-ReLU,
             skips at 1/8, 1/4, 1/2 (`n_skip` of them), head Conv3x3 -> num_classes logits;
             with aux_classes = K > 0 a second Conv3x3 head on the same decoder output gives K
             auxiliary logits, appended in train mode only (models/aux.py has the contract).

Shapes for R50-ViT-B_16 at S = 224, in_channels = 2:
    x (B, 2, 224, 224) -> stem 64 @ 112 (skip 3) -> stage1 256 @ 56 (skip 2) -> stage2 512 @ 28
    (skip 1) -> stage3 1024 @ 14 -> tokens (B, 196, 768) -> 12 blocks -> (B, 768, 14, 14)
    -> CUP 512 @ 14 -> 256 @ 28 -> 128 @ 56 -> 64 @ 112 -> 16 @ 224 -> logits (B, 1, 224, 224).

Deviations from the official code (Beckschen/TransUNet), all documented in docs/models.md: timm uses
TF-"same" padding (as Google's original R50 does) and a fused qkv projection with
`F.scaled_dot_product_attention`; dropout `p` is applied after the embeddings, on the MLP and on
the attention output projection (official: the latter uses the attention dropout rate, 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer

from .aux import AuxHead, check_aux_classes


@dataclass(frozen=True)
class TransUNetSpec:
    """Sizes of one TransUNet variant. `cnn_layers == ()` means a pure ViT (patch_size 16)."""

    cnn_layers: tuple[int, ...]  # bottleneck units per ResNet stage (paper: 3, 4, 9)
    cnn_channels: tuple[int, ...]  # output channels of those stages (paper: 256, 512, 1024)
    stem_channels: int  # stem conv output (paper: 64), also the 1/2 skip
    gn_groups: int  # GroupNorm groups in the CNN (paper: 32)
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    head_channels: int  # first CUP conv (paper: 512)
    decoder_channels: tuple[int, int, int, int]  # paper: (256, 128, 64, 16)
    default_n_skip: int
    default_dropout: float


SPECS: dict[str, TransUNetSpec] = {
    # The paper's R50-ViT-B_16: 105,275,921 parameters at 3 in / 1 out (docs/models.md,
    # "The official TransUNet").
    "transunet_r50_vit_b16": TransUNetSpec(
        cnn_layers=(3, 4, 9), cnn_channels=(256, 512, 1024), stem_channels=64, gn_groups=32,
        embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        head_channels=512, decoder_channels=(256, 128, 64, 16), default_n_skip=3, default_dropout=0.1),
    # Pure ViT-B/16 encoder, no CNN, so no skips: 91,673,041 parameters at 3 in / 1 out.
    "transunet_vit_b16": TransUNetSpec(
        cnn_layers=(), cnn_channels=(), stem_channels=0, gn_groups=32,
        embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
        head_channels=512, decoder_channels=(256, 128, 64, 16), default_n_skip=0, default_dropout=0.1),
    # Same architecture scaled down for 2 CPU cores at 128^2 (the `cpu` preset); sizes and step
    # times in docs/models.md.
    "transunet_small": TransUNetSpec(
        cnn_layers=(1, 1, 2), cnn_channels=(64, 128, 256), stem_channels=16, gn_groups=8,
        embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
        head_channels=96, decoder_channels=(48, 24, 12, 8), default_n_skip=3, default_dropout=0.0),
    # For tests: a forward + backward of batch 2 at 64^2 in a fraction of a second.
    "transunet_tiny": TransUNetSpec(
        cnn_layers=(1, 1, 1), cnn_channels=(32, 64, 128), stem_channels=16, gn_groups=4,
        embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
        head_channels=32, decoder_channels=(32, 16, 8, 8), default_n_skip=3, default_dropout=0.0),
}

# Options accepted by build_model for TransUNet variants, with what they mean.
OPTIONS = {
    "n_skip": "number of CNN skips used by the decoder, 0-3 (1/8, 1/4, 1/2); 0 for transunet_vit_b16",
    "dropout": "dropout after the embeddings, in the MLPs and on the attention output (paper 0.1)",
    "attn_dropout": "dropout on the attention weights (paper 0.0)",
    "drop_path": "stochastic depth rate of the transformer blocks (paper 0.0)",
    "grad_checkpointing": "recompute transformer blocks in backward to save activation memory",
}


class ConvBNReLU(nn.Sequential):
    """Conv3x3 (no bias, BN follows) -> BatchNorm -> ReLU; the CUP decoder's unit."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Bilinear x2 upsampling, concat the skip (if any), two ConvBNReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        # align_corners=True: the official code uses nn.UpsamplingBilinear2d, which does.
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)  # (B, C, 2h, 2w)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, C + C_skip, 2h, 2w)
        return self.conv2(self.conv1(x))


class CUPDecoder(nn.Module):
    """Cascaded upsampler: (B, D, S/16, S/16) + skips -> (B, decoder_channels[-1], S, S).

    `skip_channels` are deepest first (1/8, 1/4, 1/2); block i uses skip i when i < n_skip, and
    the fourth block (1/2 -> 1/1) never has one, as in the official code.
    """

    def __init__(self, embed_dim: int, head_channels: int, decoder_channels: tuple[int, ...],
                 skip_channels: tuple[int, ...], n_skip: int):
        super().__init__()
        self.n_skip = n_skip
        self.conv_more = ConvBNReLU(embed_dim, head_channels)
        in_chs = [head_channels, *decoder_channels[:-1]]
        skip_chs = [skip_channels[i] if i < n_skip else 0 for i in range(len(decoder_channels))]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(in_chs, skip_chs, decoder_channels))

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv_more(x)  # (B, head_channels, S/16, S/16)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.n_skip else None)
        return x


def _build_vit(spec: TransUNetSpec, in_channels: int, img_size: int, dropout: float,
               attn_dropout: float, drop_path: float) -> VisionTransformer:
    """timm's ViT with the hybrid ResNet-V2 embedding (as `vit_base_r50_s16_224`), no class token."""
    vit_args = dict(
        img_size=img_size, in_chans=in_channels, num_classes=0, global_pool="", class_token=False,
        embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio, drop_rate=dropout, attn_drop_rate=attn_dropout,
        drop_path_rate=drop_path)
    if not spec.cnn_layers:
        return VisionTransformer(patch_size=16, **vit_args)
    # The arguments timm's `_resnetv2` helper uses for vit_base_r50_s16_224: post-activation
    # bottlenecks, TF-"same" padding, StdConv with eps 1e-8, GroupNorm.
    backbone = ResNetV2(
        layers=spec.cnn_layers, channels=spec.cnn_channels, stem_chs=spec.stem_channels,
        num_classes=0, global_pool="", in_chans=in_channels, preact=False, stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=spec.gn_groups))
    embed = partial(HybridEmbed, backbone=backbone)
    return VisionTransformer(patch_size=1, embed_layer=embed, **vit_args)


class TransUNet(nn.Module):
    """TransUNet returning logits (B, num_classes, S, S) for input (B, in_channels, S, S), S % 16 == 0.

    The input size may differ from `img_size` at forward time (the position embedding is then
    resized bicubically on the fly); `img_size` fixes the stored position grid.
    aux_classes = K > 0 adds `aux_head`, Conv2d(decoder_channels[-1], K, 3, padding=1) on the
    decoder output: in train mode forward returns (B, num_classes + K, S, S) (lesion logits
    first), in eval mode (B, num_classes, S, S) as without the head (models/aux.py).
    """

    def __init__(self, spec: TransUNetSpec, in_channels: int = 2, num_classes: int = 1,
                 img_size: int = 224, n_skip: int | None = None, dropout: float | None = None,
                 attn_dropout: float = 0.0, drop_path: float = 0.0, grad_checkpointing: bool = False,
                 name: str = "transunet", aux_classes: int = 0):
        super().__init__()
        n_skip = spec.default_n_skip if n_skip is None else n_skip
        max_skip = 3 if spec.cnn_layers else 0
        if not 0 <= n_skip <= max_skip:
            raise ValueError(f"n_skip={n_skip} for {name}: must be in 0..{max_skip}"
                             + ("" if max_skip else " (a pure ViT has no CNN features to skip)"))
        if img_size % 16 or img_size < 16:
            raise ValueError(f"img_size={img_size}: TransUNet needs a multiple of 16 (e.g. 128, 224)")
        self.name = name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.img_size = img_size
        self.grad_checkpointing = grad_checkpointing
        dropout = spec.default_dropout if dropout is None else dropout
        self.vit = _build_vit(spec, in_channels, img_size, dropout, attn_dropout, drop_path)
        skip_channels = (spec.cnn_channels[1], spec.cnn_channels[0], spec.stem_channels) if spec.cnn_layers else ()
        self.decoder = CUPDecoder(spec.embed_dim, spec.head_channels, spec.decoder_channels,
                                  skip_channels, n_skip)
        self.segmentation_head = nn.Conv2d(spec.decoder_channels[-1], num_classes, 3, padding=1)
        self.aux_classes = check_aux_classes(aux_classes)
        self.aux_head = AuxHead(spec.decoder_channels[-1], aux_classes) if aux_classes else None

    def encode_cnn(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, S, S) -> feature map (B, D, S/16, S/16) and skips [1/8, 1/4, 1/2] (deepest first)."""
        embed = self.vit.patch_embed
        if not hasattr(embed, "backbone"):  # pure ViT: 16x16 patches
            return embed.proj(x), []
        cnn = embed.backbone
        half = cnn.stem.norm(cnn.stem.conv(x))  # (B, 64, S/2, S/2), before the max-pool
        quarter = cnn.stages[0](cnn.stem.pool(half))  # (B, 256, S/4, S/4)
        eighth = cnn.stages[1](quarter)  # (B, 512, S/8, S/8)
        x = cnn.stages[2](eighth)  # (B, 1024, S/16, S/16)
        return embed.proj(cnn.norm(x)), [eighth, quarter, half]  # (B, D, S/16, S/16)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, D): the learned grid, bicubically resized if the input size differs."""
        pos = self.vit.pos_embed  # (1, g*g, D)
        g = self.img_size // 16
        if (h, w) == (g, g):
            return pos
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        if size[0] % 16 or size[1] % 16:
            raise ValueError(f"input {tuple(x.shape)}: height and width must be multiples of 16")
        feat, skips = self.encode_cnn(x)  # (B, D, h, w)
        b, d, h, w = feat.shape
        tokens = feat.flatten(2).transpose(1, 2) + self.position_embedding(h, w)  # (B, h*w, D)
        tokens = self.vit.pos_drop(tokens)
        for block in self.vit.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        tokens = self.vit.norm(tokens)  # (B, h*w, D)
        feat = tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
        decoded = self.decoder(feat, skips)  # (B, decoder_channels[-1], S, S)
        logits = self.segmentation_head(decoded)  # (B, num_classes, S, S)
        if self.aux_head is not None and self.aux_head.active:
            return torch.cat([logits, self.aux_head(decoded)], dim=1)  # (B, num_classes + K, S, S)
        return logits
