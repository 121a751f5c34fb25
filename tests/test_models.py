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


# ------------------------------------------------------------------------------ weights: the official
# ImageNet-21k R50+ViT-B_16.npz layout, written from the key names and shapes of Google's file as
# the official TransUNet code (Beckschen/TransUNet, networks/vit_seg_modeling.py `load_from` and
# vit_seg_modeling_resnet_skip.py `PreActBottleneck.load_from`) reads it, not from our model.

R50_UNITS = (3, 4, 9)  # units per ResNet stage ("block1..3"), width 64 -> mid 64/128/256, out 4x


def official_r50_vit_b16_npz(path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write (and return) every array of Google's R50+ViT-B_16.npz at its official shape:
    3 input channels, 224^2 -> a 14x14 grid plus the class-token row, random float32 values.
    GroupNorm parameters are written (C,) in stages 1-2 and (1, 1, 1, C) in stage 3 (Google's
    files use both; the official code `.view(-1)`s them)."""
    rng = np.random.default_rng(seed)
    arrays = {}

    def put(name, *shape):
        arrays[name] = rng.standard_normal(shape, dtype=np.float32)

    put("conv_root/kernel", 7, 7, 3, 64)
    put("gn_root/scale", 64)
    put("gn_root/bias", 64)
    cin = 64
    for s, n_units in enumerate(R50_UNITS, start=1):
        mid = 64 * 2 ** (s - 1)
        cout = 4 * mid
        gn = (lambda c: (c,)) if s < 3 else (lambda c: (1, 1, 1, c))
        for u in range(1, n_units + 1):
            unit = f"block{s}/unit{u}/"
            put(unit + "conv1/kernel", 1, 1, cin if u == 1 else cout, mid)
            put(unit + "conv2/kernel", 3, 3, mid, mid)
            put(unit + "conv3/kernel", 1, 1, mid, cout)
            for g, c in (("gn1", mid), ("gn2", mid), ("gn3", cout)):
                put(f"{unit}{g}/scale", *gn(c))
                put(f"{unit}{g}/bias", *gn(c))
            if u == 1:  # the projection shortcut of each stage's first unit
                put(unit + "conv_proj/kernel", 1, 1, cin, cout)
                put(unit + "gn_proj/scale", *gn(cout))
                put(unit + "gn_proj/bias", *gn(cout))
        cin = cout
    put("embedding/kernel", 1, 1, 1024, 768)
    put("embedding/bias", 768)
    put("Transformer/posembed_input/pos_embedding", 1, 197, 768)
    for i in range(12):
        block = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            put(f"{block}{ln}/scale", 768)
            put(f"{block}{ln}/bias", 768)
        for qkv in ("query", "key", "value"):
            put(f"{block}MultiHeadDotProductAttention_1/{qkv}/kernel", 768, 12, 64)
            put(f"{block}MultiHeadDotProductAttention_1/{qkv}/bias", 12, 64)
        put(f"{block}MultiHeadDotProductAttention_1/out/kernel", 12, 64, 768)
        put(f"{block}MultiHeadDotProductAttention_1/out/bias", 768)
        put(f"{block}MlpBlock_3/Dense_0/kernel", 768, 3072)
        put(f"{block}MlpBlock_3/Dense_0/bias", 3072)
        put(f"{block}MlpBlock_3/Dense_1/kernel", 3072, 768)
        put(f"{block}MlpBlock_3/Dense_1/bias", 768)
    put("Transformer/encoder_norm/scale", 768)
    put("Transformer/encoder_norm/bias", 768)
    # Classification parts a segmentation model ignores (the real head is (768, 21843): cut to
    # 10 classes here to keep the file small).
    put("cls", 1, 1, 768)
    put("pre_logits/kernel", 768, 768)
    put("pre_logits/bias", 768)
    put("head/kernel", 768, 10)
    put("head/bias", 10)
    np.savez(path, **arrays)
    return arrays


def _expected_encoder(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What the documented transformation gives for each encoder tensor of our model (3 input
    channels, stored grid): conv kernels HWIO -> OIHW, dense (in, out) -> (out, in), q/k/v
    (768, 12, 64) -> (768, 768)^T concatenated into timm's fused qkv, out (12, 64, 768) ->
    (768, 768)^T, norms flattened."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    conv = lambda a: t(a.transpose(3, 2, 0, 1))  # noqa: E731
    vec = lambda a: t(a.reshape(-1))  # noqa: E731
    cnn = "vit.patch_embed.backbone."
    out = {cnn + "stem.conv.weight": conv(arrays["conv_root/kernel"]),
           cnn + "stem.norm.weight": vec(arrays["gn_root/scale"]),
           cnn + "stem.norm.bias": vec(arrays["gn_root/bias"])}
    for s, n_units in enumerate(R50_UNITS):
        for u in range(n_units):
            ours, theirs = f"{cnn}stages.{s}.blocks.{u}.", f"block{s + 1}/unit{u + 1}/"
            pairs = [(f"conv{r}", f"norm{r}", f"conv{r}", f"gn{r}") for r in (1, 2, 3)]
            if u == 0:
                pairs.append(("downsample.conv", "downsample.norm", "conv_proj", "gn_proj"))
            for c, n, gc, gn in pairs:
                out[f"{ours}{c}.weight"] = conv(arrays[f"{theirs}{gc}/kernel"])
                out[f"{ours}{n}.weight"] = vec(arrays[f"{theirs}{gn}/scale"])
                out[f"{ours}{n}.bias"] = vec(arrays[f"{theirs}{gn}/bias"])
    out["vit.patch_embed.proj.weight"] = conv(arrays["embedding/kernel"])
    out["vit.patch_embed.proj.bias"] = vec(arrays["embedding/bias"])
    for i in range(12):
        ours, theirs = f"vit.blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = theirs + "MultiHeadDotProductAttention_1/"
        out[ours + "attn.qkv.weight"] = torch.cat(
            [t(arrays[f"{mha}{n}/kernel"].reshape(768, 768).T) for n in ("query", "key", "value")])
        out[ours + "attn.qkv.bias"] = torch.cat(
            [vec(arrays[f"{mha}{n}/bias"]) for n in ("query", "key", "value")])
        out[ours + "attn.proj.weight"] = t(arrays[mha + "out/kernel"].reshape(768, 768).T)
        out[ours + "attn.proj.bias"] = vec(arrays[mha + "out/bias"])
        for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{ours}{norm}.weight"] = vec(arrays[f"{theirs}{ln}/scale"])
            out[f"{ours}{norm}.bias"] = vec(arrays[f"{theirs}{ln}/bias"])
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{ours}mlp.{fc}.weight"] = t(arrays[f"{theirs}MlpBlock_3/{dense}/kernel"].T)
            out[f"{ours}mlp.{fc}.bias"] = vec(arrays[f"{theirs}MlpBlock_3/{dense}/bias"])
    out["vit.norm.weight"] = vec(arrays["Transformer/encoder_norm/scale"])
    out["vit.norm.bias"] = vec(arrays["Transformer/encoder_norm/bias"])
    return out


def _check_official_load(model: torch.nn.Module, arrays: dict[str, np.ndarray],
                         expected: dict[str, torch.Tensor], grid: int) -> None:
    """Every encoder tensor of `model` (2 input channels, `grid`^2 tokens) equals the file's
    after the documented transformation; the 3-channel root conv became 2 channels as
    mean_RGB * 3 / 2; the position embedding lost its class row and was resized bicubically."""
    sd = model.state_dict()
    expected = dict(expected)
    vit_keys = {k for k in sd if k.startswith("vit.") and not k.endswith("num_batches_tracked")}
    assert vit_keys - set(expected) == {"vit.pos_embed"}  # every other encoder tensor checked
    stem = "vit.patch_embed.backbone.stem.conv.weight"
    rgb = expected.pop(stem)  # (64, 3, 7, 7)
    torch.testing.assert_close(sd[stem], rgb.mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5)
    for key, value in expected.items():
        torch.testing.assert_close(sd[key], value, rtol=0, atol=0, msg=key)
    pos = torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"][:, 1:])  # no class row
    if grid != 14:
        img = pos.reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
        pos = img.flatten(2).transpose(1, 2)
    assert sd["vit.pos_embed"].shape == (1, grid * grid, 768)
    torch.testing.assert_close(sd["vit.pos_embed"], pos)


@pytest.fixture(scope="module")
def official_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("google") / "R50+ViT-B_16.npz"
    arrays = official_r50_vit_b16_npz(path)
    return path, arrays, _expected_encoder(arrays)


def test_official_r50_vit_b16_npz_layout_loads_at_224_and_256(official_npz):
    """The paper model (on the meta device, then allocated uninitialised, to skip ~10 s of
    random init per build) takes every tensor of a file with the official names and shapes."""
    from models.weights import load_pretrained
    path, arrays, expected = official_npz
    for img_size in (224, 256):
        with torch.device("meta"):
            model = build_model("transunet_r50_vit_b16", in_channels=2, img_size=img_size)
        model = model.to_empty(device="cpu")
        load_pretrained(model, path, model_name="transunet_r50_vit_b16")
        _check_official_load(model, arrays, expected, grid=img_size // 16)
        del model


@pytest.mark.slow  # a full random-init build of the 105 M-parameter model plus the load: ~30 s
def test_official_npz_through_build_model_and_forward(official_npz):
    path, arrays, expected = official_npz
    model = build_model("transunet_r50_vit_b16", in_channels=2, img_size=256, pretrained=path)
    _check_official_load(model, arrays, expected, grid=16)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 2, 256, 256)).shape == (1, 1, 256, 256)


def test_official_npz_missing_key_is_named(tmp_path, official_npz):
    _, arrays, _ = official_npz
    broken = dict(arrays)
    del broken["block3/unit9/conv2/kernel"]
    path = tmp_path / "R50+ViT-B_16.npz"
    np.savez(path, **broken)
    with torch.device("meta"):
        model = build_model("transunet_r50_vit_b16", in_channels=2, img_size=224)
    from models.weights import load_pretrained
    with pytest.raises(WeightsError) as err:
        load_pretrained(model, path, model_name="transunet_r50_vit_b16")
    message = str(err.value)
    assert str(path) in message and "transunet_r50_vit_b16" in message
    assert "block3/unit9/conv2/kernel" in message and "fix:" in message


def test_torchvision_resnet34_file_loads_into_unet_resnet34_encoder(tmp_path):
    """An ImageNet ResNet-34 state_dict in torchvision's layout (resnet34-333f7ec4.pth; random
    values here) fills smp's encoder; conv1 becomes 2-channel as mean_RGB * 3 / 2."""
    import torchvision
    torch.manual_seed(0)
    src = _randomise(torchvision.models.resnet34(weights=None)).state_dict()
    path = tmp_path / "resnet34-333f7ec4.pth"
    torch.save(src, path)
    model = build_model("unet_resnet34", in_channels=2, img_size=64, pretrained=path)
    enc = model.encoder.state_dict()
    assert set(enc) == set(src) - {"fc.weight", "fc.bias"}
    rgb = src["conv1.weight"]  # (64, 3, 7, 7)
    torch.testing.assert_close(enc["conv1.weight"], rgb.mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5)
    for key, value in enc.items():
        if key != "conv1.weight":
            torch.testing.assert_close(value, src[key], rtol=0, atol=0, msg=key)
    # A file of another encoder: the file, the model, the first key it lacks and the fix.
    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(WeightsError) as err:
        build_model("unet_resnet34", in_channels=2, img_size=64, pretrained=other)
    message = str(err.value)
    assert f"pretrained weights {other} do not fit model 'unet_resnet34'" in message
    assert "missing from the file: encoder.layer1.2.conv1.weight" in message
    assert "fix:" in message and "'resnet34'" in message and "resnet34-333f7ec4.pth" in message


# ------------------------------------------------------------------------------ SyncBatchNorm

@pytest.mark.parametrize("name", ["transunet_tiny", "unet_resnet18"])
def test_convert_sync_bn_replaces_every_batchnorm_and_keeps_groupnorm(name):
    from models import convert_sync_bn
    model = _randomise(build_model(name, in_channels=2, img_size=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    n_gn = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert n_bn > 0 and (n_gn > 0) == name.startswith("transunet")
    model = convert_sync_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == n_bn
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == n_gn
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_sync_bn_default_rule():
    from models import sync_bn_default
    assert sync_bn_default(3) and sync_bn_default(8) and sync_bn_default(15)
    assert not sync_bn_default(16) and not sync_bn_default(24)
    assert sync_bn_default(24, threshold=32)
    with pytest.raises(ValueError, match="per_gpu_batch"):
        sync_bn_default(0)
