"""Tests for the sliding-window inference in inference.py (tiles, padding, Gaussian weights).

    python -m pytest tests/test_sliding_window.py -q

The core property: a model whose output at a pixel is a fixed function of the input at that
pixel gives exactly that function everywhere (borders, uneven sizes, images smaller than the
tile), whatever the overlap and weighting, because the weights cancel in the weighted mean.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inference import (PAD_VALUE, gaussian_importance_map, pad_to_patch, predict_volume,
                       predict_volume_sliding, sliding_window_logits, tile_starts, tile_step)
from models import build_model


class PixelModel(torch.nn.Module):
    """(B, 2, P, P) -> (B, 2, P, P): a per-pixel function of the input, no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([2 * x[:, :1] + 1, x[:, 1:2] - 0.5 * x[:, :1] ** 2], dim=1)


def pixel_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([2 * x[:, :1] + 1, x[:, 1:2] - 0.5 * x[:, :1] ** 2], dim=1)


class TileMeanModel(torch.nn.Module):
    """Every pixel of a tile gets the tile's mean of channel 0: depends on the tile position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:]) + 0


class FakeStudy:
    """The part of data.CachedStudy that the predictors read."""

    def __init__(self, image: np.ndarray):
        self._image = image  # (Z, 2, X, Y) float16

    def image(self) -> np.ndarray:
        return self._image

    @property
    def shape(self) -> tuple[int, int, int]:
        z, _, x, y = self._image.shape
        return x, y, z


@pytest.mark.parametrize("size", [(100, 77), (64, 64), (33, 32), (20, 9), (32, 5)])
@pytest.mark.parametrize("overlap", [0.5, 0.75])
@pytest.mark.parametrize("gaussian", [True, False])
def test_per_pixel_model_is_reproduced_everywhere(size, overlap, gaussian):
    torch.manual_seed(0)
    image = torch.rand(3, 2, *size) * 2 - 1
    out = sliding_window_logits(PixelModel(), image, patch=32, overlap=overlap, batch_size=5,
                                gaussian=gaussian)
    ref = pixel_reference(image)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-5
    # The borders explicitly (the last tile is flush with them; padding is cropped away).
    for border in (out[..., 0, :] - ref[..., 0, :], out[..., -1, :] - ref[..., -1, :],
                   out[..., :, 0] - ref[..., :, 0], out[..., :, -1] - ref[..., :, -1]):
        assert border.abs().max() < 1e-5


def test_weighted_mean_matches_a_brute_force_reference():
    """A model that is not per-pixel: the blend is sum_t w f_t / sum_t w over covering tiles."""
    torch.manual_seed(1)
    image = torch.rand(1, 2, 40, 37)
    patch, overlap = 16, 0.5
    out = sliding_window_logits(TileMeanModel(), image, patch=patch, overlap=overlap, batch_size=7)
    w = gaussian_importance_map(patch).double().numpy()
    step = round(patch * (1 - overlap))
    num = np.zeros((40, 37))
    den = np.zeros((40, 37))
    img = image[0, 0].double().numpy()
    for a in list(range(0, 40 - patch, step)) + [40 - patch]:
        for b in list(range(0, 37 - patch, step)) + [37 - patch]:
            num[a:a + patch, b:b + patch] += w * img[a:a + patch, b:b + patch].mean()
            den[a:a + patch, b:b + patch] += w
    np.testing.assert_allclose(out[0, 0].double().numpy(), num / den, rtol=1e-5, atol=1e-6)


def test_gaussian_importance_map_is_as_documented():
    for patch in (31, 32):
        w = gaussian_importance_map(patch)
        assert w.shape == (patch, patch) and w.dtype == torch.float32
        assert w.max() == 1.0 and (w > 0).all()
        c = patch // 2
        assert w[c, c] == 1.0 and w[patch - 1 - c, patch - 1 - c] == 1.0  # centre (both central for even)
        torch.testing.assert_close(w, w.flip(0).flip(1))  # centred: symmetric under flips
        # exp(-(i - c)^2 / (2 sigma^2)) per axis, c = (patch - 1) / 2, sigma = patch / 8, over its max.
        sigma, centre = patch / 8, (patch - 1) / 2
        g = lambda i: math.exp(-(i - centre) ** 2 / (2 * sigma ** 2))  # noqa: E731
        expected_corner = g(0) ** 2 / g(c) ** 2
        assert w[0, 0].item() == pytest.approx(expected_corner, rel=1e-5)
        assert 1e-8 < w[0, 0] < 1e-6  # ~exp(-16): tiny but positive
        assert w[c, 0].item() == pytest.approx(g(0) / g(c), rel=1e-5)
    # A very narrow Gaussian underflows in float32: zeros become the smallest non-zero value.
    w = gaussian_importance_map(64, sigma_scale=1 / 64)  # sigma = 1 pixel
    i = torch.arange(64, dtype=torch.float64) - 31.5
    raw = torch.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / 2) / math.exp(-0.25)  # max 1 (at i = +-0.5)
    raw = raw.float()
    assert (raw == 0).sum() > 1000  # the narrow Gaussian underflows over most of the tile
    assert (w > 0).all() and w.max() == 1.0
    assert w[raw == 0].unique().numel() == 1 and w[0, 0] == w.min()  # one fill value, the smallest
    normal = raw > 1e-30  # away from float32's subnormal range, where rounding differs
    torch.testing.assert_close(w[normal], raw[normal], rtol=1e-5, atol=0)


def test_tiles_and_padding_helpers():
    assert tile_step(32, 0.5) == 16 and tile_step(32, 0.75) == 8 and tile_step(3, 0.9) == 1
    assert tile_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert tile_starts(64, 32, 16) == [0, 16, 32]
    assert tile_starts(32, 32, 16) == [0] and tile_starts(10, 32, 16) == [0]
    x = torch.zeros(1, 2, 20, 9)
    padded, (sx, sy) = pad_to_patch(x, 32)
    assert padded.shape == (1, 2, 32, 32) and (sx, sy) == (slice(6, 26), slice(11, 20))
    assert (padded[..., sx, sy] == 0).all()
    assert (padded == PAD_VALUE).sum() == 2 * (32 * 32 - 20 * 9) and PAD_VALUE == -1.0


def test_small_images_are_padded_with_air():
    """The model sees -1 (air, no uptake) around an image smaller than the patch."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x[:, :1]

    image = torch.full((1, 2, 10, 12), 0.25)
    out = sliding_window_logits(Spy(), image, patch=16)
    assert out.shape == (1, 1, 10, 12) and torch.allclose(out, torch.full_like(out, 0.25))
    tile = seen[0][0]
    assert tile.shape == (2, 16, 16) and tile[:, 3:13, 2:14].eq(0.25).all()
    assert tile[:, :3].eq(-1).all() and tile[:, 13:].eq(-1).all() and tile[:, :, :2].eq(-1).all()


def test_errors_and_mode_restored():
    model = PixelModel().train()
    image = torch.zeros(1, 2, 40, 40)
    for overlap in (0.3, 1.0, -0.1):
        with pytest.raises(ValueError, match="overlap"):
            sliding_window_logits(model, image, patch=16, overlap=overlap)
    with pytest.raises(ValueError, match="patch"):
        sliding_window_logits(model, image, patch=0)
    with pytest.raises(ValueError, match=r"\(N, C, X, Y\)"):
        sliding_window_logits(model, image[0], patch=16)
    with pytest.raises(ValueError, match="tile's size"):
        sliding_window_logits(torch.nn.AvgPool2d(2), image, patch=16)
    sliding_window_logits(model, image, patch=16)
    assert model.training  # eval inside, previous mode back


def test_autocast_bf16_on_cpu_returns_float32():
    conv = torch.nn.Conv2d(2, 1, 1)
    image = torch.rand(2, 2, 40, 30)
    out = sliding_window_logits(conv, image, patch=16, amp_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, conv(image), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("tta,context_slices", [(False, 0), (True, 1)])
def test_predict_volume_sliding_with_one_tile_equals_predict_volume(tta, context_slices):
    torch.manual_seed(0)
    in_channels = 2 * (2 * context_slices + 1)
    model = build_model("transunet_tiny", in_channels=in_channels, img_size=32).eval()
    rng = np.random.default_rng(0)
    study = FakeStudy(rng.uniform(-1, 1, (3, 2, 32, 32)).astype(np.float16))
    ref = predict_volume(model, study, img_size=32, batch_size=3, device="cpu", tta=tta,
                         context_slices=context_slices)
    out = predict_volume_sliding(model, study, patch=32, batch_size=3, device="cpu", tta=tta,
                                 context_slices=context_slices)
    assert out.shape == ref.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_predict_volume_sliding_on_a_larger_slice():
    """Slices bigger than the patch: per-pixel model -> sigmoid of the per-pixel function."""
    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (4, 2, 45, 38)).astype(np.float16)
    out = predict_volume_sliding(PixelModel(), FakeStudy(image), patch=16, overlap=0.75,
                                 batch_size=2, tta=True)
    x = torch.from_numpy(image.astype(np.float32))  # (Z, 2, X, Y)
    ref = torch.sigmoid(2 * x[:, 0] + 1).permute(1, 2, 0).numpy()  # (X, Y, Z)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
