"""Pretrained weights from a local file: Google's ViT / R50+ViT `.npz`, or a torch state_dict.

Nothing is downloaded. `load_pretrained(model, path, model_name)` reads the file, maps it onto the
model's state_dict keys, adapts what can be adapted and raises `WeightsError` (naming the file, the
keys / shapes that differ and the fix) for everything else.

Adaptations:
- input channels of the first conv (a 3-channel RGB stem on 2-channel CT + PET):
  w_new[:, c] = mean_k(w[:, k]) * C_src / C_new for every new channel c, so a constant image gives
  the same response as before (as timm's `adapt_input_conv`, which sums for C_new = 1);
- position embedding: leading class-token rows are dropped (TransUNet has none), the grid is
  resized bicubically (timm's `resample_abs_pos_embed` convention, align_corners=False; the
  official TransUNet `load_from` zooms it with scipy.ndimage.zoom(order=1), i.e. linearly, so
  at img_size != 224 the two differ slightly; at 224 the 14x14 grid is copied as is);
- an smp encoder file (torchvision / timm ResNet layout: conv1, bn1, layer1..4, fc) is matched
  under the model's "encoder." prefix; its RGB conv1 is adapted as above (2 channels: each
  mean_RGB * 3 / 2) and its classifier (fc) is ignored;
- a file that holds only an encoder (Google's npz, a timm ViT or an smp encoder checkpoint)
  leaves the decoder and segmentation head at their random initialisation;
- the auxiliary head (`aux_head.*`, models/aux.py): a file without one leaves a model's head at
  its initialisation, a file with one loads into a model without it (the head is dropped).

npz layout (Google research vision_transformer, as read by Beckschen/TransUNet and timm):
    conv kernels HWIO, dense kernels (in, out), attention query/key/value kernels (D, heads, D/heads)
    and biases (heads, D/heads), attention out kernel (heads, D/heads, D), GroupNorm / LayerNorm
    `scale` and `bias` (possibly (1, 1, 1, C)).
    conv_root/kernel, gn_root/{scale,bias}                         ResNet stem
    block{s}/unit{u}/{conv1,conv2,conv3,conv_proj}/kernel          ResNet stage s, unit u (1-based)
    block{s}/unit{u}/{gn1,gn2,gn3,gn_proj}/{scale,bias}
    embedding/{kernel,bias}                                        patch embedding
    Transformer/posembed_input/pos_embedding                       (1, 1 + g*g, D), class row first
    Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_2           pre-attention / pre-MLP LN
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value,out}/{kernel,bias}
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_0, Dense_1/{kernel,bias}
    Transformer/encoder_norm/{scale,bias}
"""
from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Parts a file may lack entirely (an encoder-only checkpoint); they then keep their random init.
OPTIONAL_PREFIXES = ("decoder.", "segmentation_head.", "aux_head.")
# Classifier / token parameters of timm or torchvision models that a segmentation model has no use for.
_IGNORABLE = re.compile(
    r"(^|\.)(head|fc|classifier|pre_logits|fc_norm|cls_token|reg_token|dist_token|head_dist|aux_head)(\.|$)")


class WeightsError(ValueError):
    """A weights file that cannot be loaded into the model (message names the file and the fix)."""

    user_error = True  # runtime.exit_on_user_error prints it without a traceback


# ---------------------------------------------------------------------------------------------
# reading files

def read_weights_file(path: str | Path) -> tuple[str, dict]:
    """Return ("npz", {name: ndarray}) or ("torch", {key: Tensor}) for a local file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights file {path} does not exist; pass an existing local "
                           "file (nothing is downloaded) or pretrained=None to train from scratch")
    if path.suffix == ".npz":
        try:
            with np.load(path) as npz:
                return "npz", {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise WeightsError(f"{path}: not a readable .npz file ({err}); re-download it") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe pickles
        raise WeightsError(
            f"{path}: cannot be read as a torch checkpoint of tensors ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); save `model.state_dict()` with "
            "torch.save, or pass Google's .npz file") from err
    return "torch", _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the state_dict in a checkpoint ({"model": sd}, {"state_dict": sd}, sd) and strip the
    prefixes added by DDP ("module.") and torch.compile ("_orig_mod.")."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{path}: no state_dict found (expected a dict of tensors, or one under "
                           "'model' / 'state_dict'); save `model.state_dict()` with torch.save")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# adaptations

def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(O, C_src, kh, kw) -> (O, in_channels, kh, kw): mean over the source channels, repeated and
    scaled by C_src / in_channels so the response to a constant image is unchanged."""
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.float().mean(dim=1, keepdim=True)  # (O, 1, kh, kw)
    scaled = mean * (weight.shape[1] / in_channels)
    return scaled.repeat(1, in_channels, 1, 1).to(weight.dtype)


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, [prefix +] g*g, D) -> (1, grid*grid, D): drop class-token rows, resize the grid bicubically."""
    n = pos.shape[1]
    g = int(round(n ** 0.5))
    if g * g != n:  # timm and Google store the class token's row first
        g = int(round((n - 1) ** 0.5))
        if g * g != n - 1:
            raise ValueError(f"{n} position rows are neither a square grid nor 1 + a square grid")
        pos = pos[:, 1:]
    if g == grid:
        return pos
    log.info("resizing position embedding grid %dx%d -> %dx%d", g, g, grid, grid)
    img = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return img.flatten(2).transpose(1, 2).to(pos.dtype)  # (1, grid*grid, D)


def _first_conv_key(model: nn.Module) -> str | None:
    """State-dict key of the weight of the first Conv2d (the one that sees the input channels)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


# ---------------------------------------------------------------------------------------------
# fitting a state_dict onto a model

def fit_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, path: str | Path,
                   model_name: str, fix: str, key_prefixes: tuple[str, ...] = ("",)) -> dict:
    """Map `sd` onto `model.state_dict()` keys, adapt the first conv and the position embedding,
    and raise one WeightsError listing every missing key and shape mismatch.

    `key_prefixes`: candidates prepended to the file's keys (e.g. "vit." for a timm ViT file, or
    "encoder." for a torchvision ResNet); the one matching most model keys wins.
    """
    target = model.state_dict()
    prefix = max(key_prefixes, key=lambda p: sum((p + k) in target for k in sd))
    sd = {prefix + k: v for k, v in sd.items()}
    first_conv = _first_conv_key(model)
    fitted, mismatched, unexpected = {}, [], []
    for key, value in sd.items():
        if key not in target:
            (log.debug if _IGNORABLE.search(key) else unexpected.append)(key)
            continue
        want = target[key].shape
        if value.shape != want and key == first_conv and value.ndim == 4 and value.shape[0] == want[0] \
                and value.shape[2:] == want[2:]:
            log.info("%s: adapting %s from %d to %d input channels", path, key, value.shape[1], want[1])
            value = adapt_input_channels(value, want[1])
        if key.endswith("pos_embed") and value.ndim == 3 and value.shape != want:
            try:
                value = resize_pos_embed(value, int(round(want[1] ** 0.5)))
            except ValueError as err:
                mismatched.append(f"{key}: {err}")
                continue
        if value.shape != want:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want)}")
            continue
        fitted[key] = value.to(target[key].dtype)
    missing = [k for k in target if k not in fitted and not k.endswith("num_batches_tracked")]
    # A part may be absent as a whole (encoder-only file), never half present.
    for part in OPTIONAL_PREFIXES:
        if not any(k.startswith(part) for k in sd):
            skipped = [k for k in missing if k.startswith(part)]
            if skipped:
                log.info("%s has no '%s*' weights: %d tensors keep their initialisation", path, part,
                         len(skipped))
            missing = [k for k in missing if not k.startswith(part)]
    if missing or mismatched or unexpected:
        raise WeightsError(_describe(path, model_name, missing, mismatched, unexpected, fix))
    return fitted


def _describe(path, model_name, missing, mismatched, unexpected, fix) -> str:
    def show(items: list[str]) -> str:
        more = f" ... ({len(items)} in all)" if len(items) > 6 else ""
        return "; ".join(items[:6]) + more

    parts = [f"pretrained weights {path} do not fit model '{model_name}'"]
    if mismatched:
        parts.append(f"shapes differ: {show(mismatched)}")
    if missing:
        parts.append(f"missing from the file: {show(missing)}")
    if unexpected:
        parts.append(f"not in the model: {show(unexpected)}")
    parts.append(f"fix: {fix}")
    return "\n  ".join(parts)


# ---------------------------------------------------------------------------------------------
# Google npz -> TransUNet encoder

def _conv(a: np.ndarray) -> torch.Tensor:  # HWIO -> OIHW
    return torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))


def _vec(a: np.ndarray) -> torch.Tensor:  # (C,) or (1, 1, 1, C) -> (C,)
    return torch.from_numpy(a.reshape(-1).copy())


def _dense(a: np.ndarray) -> torch.Tensor:  # (in, ..., out) kernels -> torch (out, in)
    return torch.from_numpy(np.ascontiguousarray(a.reshape(a.shape[0], -1).T))


def _attn_out(a: np.ndarray) -> torch.Tensor:  # (heads, D/heads, D) -> (D_out, D_in)
    return torch.from_numpy(np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T))


def npz_key_map(model: nn.Module) -> dict[str, list[tuple[str, Callable]]]:
    """{state_dict key of `model` (a TransUNet): [(npz key, converter), ...]} for its encoder.
    Several npz keys map to one tensor only for the fused qkv projection (concatenated q, k, v)."""
    vit = model.vit
    out: dict[str, list[tuple[str, Callable]]] = {}
    if hasattr(vit.patch_embed, "backbone"):
        cnn = "vit.patch_embed.backbone."
        out[cnn + "stem.conv.weight"] = [("conv_root/kernel", _conv)]
        out[cnn + "stem.norm.weight"] = [("gn_root/scale", _vec)]
        out[cnn + "stem.norm.bias"] = [("gn_root/bias", _vec)]
        for s, stage in enumerate(vit.patch_embed.backbone.stages):
            for u, unit in enumerate(stage.blocks):
                ours, theirs = f"{cnn}stages.{s}.blocks.{u}.", f"block{s + 1}/unit{u + 1}/"
                names = [(f"conv{r}", f"norm{r}", f"conv{r}", f"gn{r}") for r in (1, 2, 3)]
                if unit.downsample is not None:
                    names.append(("downsample.conv", "downsample.norm", "conv_proj", "gn_proj"))
                for conv, norm, g_conv, g_norm in names:
                    out[f"{ours}{conv}.weight"] = [(f"{theirs}{g_conv}/kernel", _conv)]
                    out[f"{ours}{norm}.weight"] = [(f"{theirs}{g_norm}/scale", _vec)]
                    out[f"{ours}{norm}.bias"] = [(f"{theirs}{g_norm}/bias", _vec)]
    out["vit.patch_embed.proj.weight"] = [("embedding/kernel", _conv)]
    out["vit.patch_embed.proj.bias"] = [("embedding/bias", _vec)]
    out["vit.pos_embed"] = [("Transformer/posembed_input/pos_embedding", torch.from_numpy)]
    for i in range(len(vit.blocks)):
        ours, theirs = f"vit.blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = theirs + "MultiHeadDotProductAttention_1/"
        for norm, g_norm in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{ours}{norm}.weight"] = [(f"{theirs}{g_norm}/scale", _vec)]
            out[f"{ours}{norm}.bias"] = [(f"{theirs}{g_norm}/bias", _vec)]
        out[ours + "attn.qkv.weight"] = [(f"{mha}{n}/kernel", _dense) for n in ("query", "key", "value")]
        out[ours + "attn.qkv.bias"] = [(f"{mha}{n}/bias", _vec) for n in ("query", "key", "value")]
        out[ours + "attn.proj.weight"] = [(mha + "out/kernel", _attn_out)]
        out[ours + "attn.proj.bias"] = [(mha + "out/bias", _vec)]
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{ours}mlp.{fc}.weight"] = [(f"{theirs}MlpBlock_3/{dense}/kernel", _dense)]
            out[f"{ours}mlp.{fc}.bias"] = [(f"{theirs}MlpBlock_3/{dense}/bias", _vec)]
    out["vit.norm.weight"] = [("Transformer/encoder_norm/scale", _vec)]
    out["vit.norm.bias"] = [("Transformer/encoder_norm/bias", _vec)]
    return out


def npz_to_state_dict(model: nn.Module, npz: Mapping[str, np.ndarray], path: str | Path,
                      model_name: str, fix: str) -> dict[str, torch.Tensor]:
    """Convert Google's npz arrays to `model`'s encoder state_dict keys (missing npz keys -> WeightsError)."""
    sd, missing = {}, []
    for key, sources in npz_key_map(model).items():
        absent = [name for name, _ in sources if name not in npz]
        if absent:
            missing += absent
            continue
        sd[key] = torch.cat([convert(np.asarray(npz[name], dtype=np.float32)) for name, convert in sources])
    if missing:
        raise WeightsError(_describe(path, model_name, missing, [], [], fix))
    return sd


# ---------------------------------------------------------------------------------------------
# entry point

def load_pretrained(model: nn.Module, path: str | Path, model_name: str) -> nn.Module:
    """Load a local weights file into `model` in place (see the module docstring); returns `model`."""
    kind, data = read_weights_file(path)
    is_transunet = hasattr(model, "vit")
    if kind == "npz":
        if not is_transunet:
            raise WeightsError(f"{path}: Google .npz weights fit only the transunet_* models, not "
                               f"'{model_name}'; pass a torch state_dict (.pt / .pth) for it")
        fix = ("use Google's ImageNet-21k R50+ViT-B_16.npz with transunet_r50_vit_b16, or "
               "ViT-B_16.npz with transunet_vit_b16, or pretrained=None to train from scratch")
        data = npz_to_state_dict(model, data, path, model_name, fix)
        prefixes = ("",)
    else:
        encoder = "" if is_transunet else model_name.partition("_")[2]
        alone = (f"its encoder alone (for an smp model: an ImageNet state_dict of '{encoder}' "
                 "in the torchvision / timm layout, e.g. torchvision's resnet34-333f7ec4.pth for "
                 "resnet34)" if encoder else "its encoder alone (a timm vit_base_r50_s16_224 "
                 "state_dict)")
        fix = (f"pass a checkpoint saved from '{model_name}' (same num_classes; in_channels and "
               f"img_size may differ) or from {alone}, or pretrained=None")
        prefixes = ("", "vit.") if is_transunet else ("", "encoder.")
    fitted = fit_state_dict(model, data, path=path, model_name=model_name, fix=fix, key_prefixes=prefixes)
    model.load_state_dict(fitted, strict=False)
    log.info("loaded %d tensors from %s into %s", len(fitted), path, model_name)
    return model
