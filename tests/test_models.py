"""Tests for models/: shapes, gradients, parameter counts, weight loading and its errors.

    python -m pytest tests/test_models.py -q
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from models import WeightsError, build_model, list_models
from models.weights import adapt_input_channels, resize_pos_embed


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BN buffer distinct random values, so a mapping that swaps two
    tensors (q and k, gn1 and gn2, scale and bias) cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                values = torch.randn(t.shape, generator=g) * 0.2
                t.copy_(values.abs() + 0.5 if "running_var" in name else values)
    return model.eval()


def export_google_npz(model: torch.nn.Module, path, class_row: bool = True) -> None:
    """Write a TransUNet's encoder in Google's ViT / R50+ViT npz layout (test helper, written
    independently of models/weights.py from the layout: HWIO convs, (in, out) dense kernels,
    attention kernels (D, heads, D/heads), out kernel (heads, D/heads, D))."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.vit.state_dict().items()}
    out = {}
    hwio = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731  OIHW -> HWIO
    gn_name = {"norm1": "gn1", "norm2": "gn2", "norm3": "gn3", "downsample.norm": "gn_proj"}
    conv_name = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "downsample.conv": "conv_proj"}
    for key, w in sd.items():
        if key.startswith("patch_embed.backbone.stem."):
            part = key.split(".")[-2:]
            if part[0] == "conv":
                out["conv_root/kernel"] = hwio(w)
            else:
                out[f"gn_root/{'scale' if part[1] == 'weight' else 'bias'}"] = w
        m = re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            unit = f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}/"
            if m[3] in conv_name:
                out[f"{unit}{conv_name[m[3]]}/kernel"] = hwio(w)
            else:
                out[f"{unit}{gn_name[m[3]]}/{'scale' if m[4] == 'weight' else 'bias'}"] = w
    out["embedding/kernel"] = hwio(sd["patch_embed.proj.weight"])
    out["embedding/bias"] = sd["patch_embed.proj.bias"]
    pos = sd["pos_embed"]  # (1, g*g, D)
    if class_row:
        pos = np.concatenate([np.full_like(pos[:, :1], 7.0), pos], axis=1)
    out["Transformer/posembed_input/pos_embedding"] = pos
    d = pos.shape[-1]
    heads = model.vit.blocks[0].attn.num_heads
    for i in range(len(model.vit.blocks)):
        b, root = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = root + "MultiHeadDotProductAttention_1/"
        q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)  # each (D_out, D_in)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        for name, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{mha}{name}/kernel"] = w.T.reshape(d, heads, d // heads)
            out[f"{mha}{name}/bias"] = bias.reshape(heads, d // heads)
        out[mha + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, d // heads, d)
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{root}{ln}/scale"] = sd[f"{b}{norm}.weight"]
            out[f"{root}{ln}/bias"] = sd[f"{b}{norm}.bias"]
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{root}MlpBlock_3/{dense}/kernel"] = sd[f"{b}mlp.{fc}.weight"].T
            out[f"{root}MlpBlock_3/{dense}/bias"] = sd[f"{b}mlp.{fc}.bias"]
    out["Transformer/encoder_norm/scale"] = sd["norm.weight"]
    out["Transformer/encoder_norm/bias"] = sd["norm.bias"]
    # What the real ImageNet-21k file also holds and a segmentation model ignores.
    out["cls"] = np.zeros((1, 1, d), np.float32)
    out["head/kernel"] = np.zeros((d, 5), np.float32)
    out["head/bias"] = np.zeros((5,), np.float32)
    np.savez(path, **out)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ shapes, gradients

@pytest.mark.parametrize("in_channels,num_classes,size,n_skip", [
    (2, 1, 64, 3), (1, 1, 32, 0), (6, 3, 96, 1), (2, 2, 48, 2)])
def test_transunet_tiny_shapes(in_channels, num_classes, size, n_skip):
    model = build_model("transunet_tiny", in_channels, num_classes, img_size=size, n_skip=n_skip)
    y = model(torch.randn(2, in_channels, size, size))
    assert y.shape == (2, num_classes, size, size)


def test_transunet_accepts_other_input_size_at_forward():
    model = build_model("transunet_tiny", img_size=64).eval()
    assert model(torch.randn(1, 2, 96, 96)).shape == (1, 1, 96, 96)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 2, 40, 40))


def test_transunet_small_shape_and_finite_gradients():
    torch.manual_seed(0)
    model = build_model("transunet_small", in_channels=2, num_classes=1, img_size=64)
    x = torch.randn(2, 2, 64, 64).contiguous(memory_format=torch.channels_last)
    y = model(x)
    assert y.shape == (2, 1, 64, 64)
    F.binary_cross_entropy_with_logits(y, (x[:, 1:] > 1).float()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Every part learns: the stem (through skips and tokens), the transformer and the head.
    for name in ("vit.patch_embed.backbone.stem.conv.weight", "vit.blocks.0.attn.qkv.weight",
                 "decoder.blocks.3.conv2.0.weight", "segmentation_head.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 2, 64, 64)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build_model("transunet_tiny", img_size=64, grad_checkpointing=flag)
        model(x).square().mean().backward()
        grads.append(model.vit.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["unet_resnet18", "unet_resnet34", "fpn_resnet34",
                                  "deeplabv3plus_resnet34", "unetplusplus_resnet34", "segformer_mit_b0"])
def test_smp_baselines_shapes(name):
    model = build_model(name, in_channels=2, num_classes=1, img_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 64, 64)).shape == (1, 1, 64, 64)


def test_list_models_names_all_buildable_on_meta():
    names = list_models()
    assert {"transunet_r50_vit_b16", "transunet_vit_b16", "transunet_small", "transunet_tiny",
            "unet_resnet34", "segformer_mit_b0"} <= set(names)
    with torch.device("meta"):  # no memory, no init cost; smp's MiT calls .item() so not on meta
        for name in names:
            if name != "segformer_mit_b0":
                assert _n_params(build_model(name, img_size=64)) > 0


# ------------------------------------------------------------------------------ parameter counts

def test_paper_parameter_counts():
    """docs/models.md, "The official TransUNet": official parameter counts (3 input channels)."""
    with torch.device("meta"):
        r50 = build_model("transunet_r50_vit_b16", in_channels=3, num_classes=1)
        r50_2 = build_model("transunet_r50_vit_b16", in_channels=3, num_classes=2)
        vit = build_model("transunet_vit_b16", in_channels=3, num_classes=1)
    for model, official in ((r50, 105_275_921), (r50_2, 105_276_066), (vit, 91_673_041)):
        assert abs(_n_params(model) - official) <= 0.001 * official
    assert _n_params(r50.decoder) == 7_387_200
    assert _n_params(r50.vit) == 97_888_576  # ResNet 11,894,848 + ViT 85,993,728
    assert _n_params(r50.vit.patch_embed.backbone) == 11_894_848
    assert _n_params(r50.vit.blocks) + _n_params(r50.vit.norm) == 85_056_000


def test_r50_encoder_is_timms_vit_base_r50_s16_224():
    """Same tensors (names and shapes) as timm's hybrid, less its class token."""
    with torch.device("meta"):
        ours = build_model("transunet_r50_vit_b16", in_channels=2, img_size=224).vit.state_dict()
        ref = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0, in_chans=2,
                                img_size=224, class_token=False, global_pool="").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


# ------------------------------------------------------------------------------ weights: npz

def test_npz_round_trip_gives_identical_outputs(tmp_path):
    src = _randomise(build_model("transunet_tiny", in_channels=3, img_size=64))
    path = tmp_path / "R50+ViT-B_16.npz"
    export_google_npz(src, path, class_row=True)
    dst = build_model("transunet_tiny", in_channels=3, img_size=64, pretrained=path).eval()
    ref_sd = src.vit.state_dict()
    for key, value in dst.vit.state_dict().items():
        torch.testing.assert_close(value, ref_sd[key], rtol=0, atol=0, msg=key)
    # The npz carries no decoder: copy it, then the whole network must agree.
    dst.decoder.load_state_dict(src.decoder.state_dict())
    dst.segmentation_head.load_state_dict(src.segmentation_head.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_npz_mapping_agrees_with_timms_loader(tmp_path):
    """timm's own Google-npz reader as an independent oracle of the key names and layouts."""
    from timm.models.vision_transformer import _load_weights
    src = _randomise(build_model("transunet_tiny", in_channels=3, img_size=64))
    path = tmp_path / "w.npz"
    export_google_npz(src, path, class_row=False)
    ours = build_model("transunet_tiny", in_channels=3, img_size=64, pretrained=path)
    oracle = build_model("transunet_tiny", in_channels=3, img_size=64)
    _load_weights(oracle.vit, str(path))
    oracle_sd = oracle.vit.state_dict()
    for key, value in ours.vit.state_dict().items():
        torch.testing.assert_close(value, oracle_sd[key], msg=key)


def test_npz_rgb_stem_adapted_to_two_channels_and_pos_embed_resized(tmp_path):
    src = _randomise(build_model("transunet_tiny", in_channels=3, img_size=64))
    path = tmp_path / "w.npz"
    export_google_npz(src, path)
    dst = build_model("transunet_tiny", in_channels=2, img_size=128, pretrained=path)
    w_rgb = src.vit.patch_embed.backbone.stem.conv.weight  # (16, 3, 7, 7)
    expected = w_rgb.mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5  # mean * 3 / 2, repeated
    torch.testing.assert_close(dst.vit.patch_embed.backbone.stem.conv.weight, expected)
    # 4x4 grid -> 8x8, bicubic, class row dropped.
    grid = src.vit.pos_embed.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected_pos = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(dst.vit.pos_embed, expected_pos.flatten(2).transpose(1, 2))
    assert dst(torch.randn(1, 2, 128, 128)).shape == (1, 1, 128, 128)


def test_adapt_input_channels_keeps_constant_image_response():
    w = torch.randn(8, 3, 3, 3)
    for c in (1, 2, 5):
        a = adapt_input_channels(w, c)
        assert a.shape == (8, c, 3, 3)
        torch.testing.assert_close(a.sum(1), w.sum(1))


def test_resize_pos_embed_identity_and_class_row():
    pos = torch.randn(1, 1 + 16, 8)
    torch.testing.assert_close(resize_pos_embed(pos, 4), pos[:, 1:])
    assert resize_pos_embed(pos, 6).shape == (1, 36, 8)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 15, 8), 4)


def test_npz_that_does_not_fit_names_file_keys_and_fix(tmp_path):
    path = tmp_path / "ViT-B_16.npz"
    export_google_npz(_randomise(build_model("transunet_tiny", in_channels=3, img_size=64)), path)
    # Another architecture: more CNN units and transformer blocks than the file has.
    with pytest.raises(WeightsError) as err:
        build_model("transunet_small", img_size=64, pretrained=path)
    message = str(err.value)
    assert str(path) in message and "transunet_small" in message and "fix:" in message
    assert "block3/unit2/conv1/kernel" in message  # a key the file lacks
    # Same key names, wrong widths: shapes are listed.
    arrays = dict(np.load(path))
    arrays["Transformer/encoder_norm/scale"] = np.ones(3, np.float32)
    np.savez(path, **arrays)
    with pytest.raises(WeightsError, match=r"vit\.norm\.weight: file \(3,\) vs model \(64,\)"):
        build_model("transunet_tiny", img_size=64, pretrained=path)


# ------------------------------------------------------------------------------ weights: torch

def test_state_dict_round_trip_with_wrappers(tmp_path):
    src = _randomise(build_model("transunet_tiny", in_channels=2, img_size=64))
    sd = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}  # DDP + compile prefixes
    path = tmp_path / "best.pt"
    torch.save({"model": sd, "epoch": 3}, path)
    dst = build_model("transunet_tiny", in_channels=2, img_size=64, pretrained=path).eval()
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_timm_encoder_checkpoint_loads_encoder_only(tmp_path):
    src = _randomise(build_model("transunet_tiny", in_channels=3, img_size=64))
    sd = dict(src.vit.state_dict())  # timm key space: no "vit." prefix
    sd["pos_embed"] = torch.cat([torch.zeros(1, 1, 64), sd["pos_embed"]], dim=1)
    sd["cls_token"] = torch.zeros(1, 1, 64)
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 64), torch.zeros(10)
    path = tmp_path / "timm.pth"
    torch.save(sd, path)
    torch.manual_seed(1)
    dst = build_model("transunet_tiny", in_channels=2, img_size=64, pretrained=path)
    torch.testing.assert_close(dst.vit.blocks[1].mlp.fc2.weight, src.vit.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(dst.vit.pos_embed, src.vit.pos_embed)
    assert dst.vit.patch_embed.backbone.stem.conv.weight.shape[1] == 2


def test_state_dict_errors(tmp_path):
    src = build_model("transunet_tiny", num_classes=3, img_size=64)
    path = tmp_path / "three_classes.pt"
    torch.save(src.state_dict(), path)
    with pytest.raises(WeightsError, match=r"segmentation_head\.weight: file \(3, 8, 3, 3\) vs model \(1, 8, 3, 3\)"):
        build_model("transunet_tiny", num_classes=1, img_size=64, pretrained=path)
    # Half a decoder is an error, not a silent partial load.
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("decoder.blocks.3")}
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"missing from the file: decoder\.blocks\.3"):
        build_model("transunet_tiny", num_classes=3, img_size=64, pretrained=path)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("transunet_tiny", img_size=64, pretrained=tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="corrupt.pt"):
        build_model("transunet_tiny", img_size=64, pretrained=bad)
    assert issubclass(WeightsError, ValueError)


def test_smp_local_weights_full_and_encoder_only(tmp_path):
    src = _randomise(build_model("unet_resnet18", in_channels=2, img_size=64))
    full = tmp_path / "unet.pt"
    torch.save(src.state_dict(), full)
    dst = build_model("unet_resnet18", in_channels=2, img_size=64, pretrained=full).eval()
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # A torchvision-style RGB ResNet-18 (keys without "encoder.", classifier "fc").
    rgb = build_model("unet_resnet18", in_channels=3, img_size=64).encoder.state_dict()
    rgb["fc.weight"], rgb["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    enc = tmp_path / "resnet18.pth"
    torch.save(rgb, enc)
    dst = build_model("unet_resnet18", in_channels=2, img_size=64, pretrained=enc)
    torch.testing.assert_close(dst.encoder.conv1.weight.sum(1), rgb["conv1.weight"].sum(1))
    npz = tmp_path / "x.npz"
    np.savez(npz, a=np.zeros(1))
    with pytest.raises(WeightsError, match="fit only the transunet"):
        build_model("unet_resnet18", img_size=64, pretrained=npz)


# ------------------------------------------------------------------------------ user errors

def test_build_model_errors():
    with pytest.raises(ValueError, match=r"accepted:[\s\S]*n_skip[\s\S]*grad_checkpointing"):
        build_model("transunet_tiny", img_size=64, n_skips=2)
    with pytest.raises(ValueError, match="n_skip=4"):
        build_model("transunet_tiny", img_size=64, n_skip=4)
    with pytest.raises(ValueError, match="pure ViT"):
        build_model("transunet_vit_b16", img_size=64, n_skip=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("transunet_tiny", img_size=72)
    with pytest.raises(ValueError, match="TransUNet variants"):
        build_model("transunet_r50", img_size=64)
    with pytest.raises(ValueError, match="arch in"):
        build_model("resunet_resnet34", img_size=64)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_model("unet_resnet35", img_size=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("unet_resnet34", img_size=80)
    with pytest.raises(ValueError, match=r"accepted: \[.*decoder_channels"):
        build_model("unet_resnet34", img_size=64, n_skip=3)


def test_transunet_tiny_fits_a_small_batch():
    """The whole network trains: 40 Adam steps on one batch of bright PET blobs cut the BCE by half."""
    torch.manual_seed(0)
    model = build_model("transunet_tiny", in_channels=2, img_size=32)
    x = torch.randn(4, 2, 32, 32) * 0.1
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    target = torch.zeros(4, 1, 32, 32)
    for i, (cy, cx) in enumerate([(8, 8), (20, 12), (16, 24), (25, 25)]):
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 9).float()
        target[i, 0] = blob
        x[i, 1] += 2 * blob  # the lesion is bright on PET
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
