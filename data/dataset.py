"""2-D (or 2.5-D) slice dataset over cached studies, with foreground oversampling.

    train_set = PetCtSliceDataset(cached_train, img_size=128, samples_per_epoch=960, seed=0)
    loader = DataLoader(train_set, batch_size=16, num_workers=2, worker_init_fn=worker_init_fn)
    for epoch in range(epochs):
        train_set.set_epoch(epoch)
        for image, mask in loader: ...        # (16, C, 128, 128), (16, 1, 128, 128)

Sampling (nnU-Net's foreground oversampling, default share 1/3): with probability
`fg_fraction` an item is a slice that contains tumour, uniform over all tumour slices of all
studies; otherwise a slice uniform over all slices of all studies (tumour slices included,
so the expected tumour-slice share is fg_fraction + (1 - fg_fraction) * natural share).
If no study has tumour, every item is drawn uniformly.

Determinism: item i of epoch e is built only from `np.random.default_rng([seed, e, i])`
(slice choice and augmentation alike), so a batch does not depend on the number of workers,
on their order or on resuming mid-run. The epoch lives in shared memory, so `set_epoch` also
reaches persistent DataLoader workers.

Channels: C = 2 * (2 * context_slices + 1): (CT, PET) of slices z - c, ..., z + c, clamped at
the ends of the volume; the centre slice is channels [2c, 2c + 1]. Slices of any in-plane
size are resampled to S x S with `to_model_grid` (bilinear for images, nearest for masks);
`from_model_grid` maps predictions back. Non-square slices are stretched to the square grid
(and stretched back): simple and exactly invertible in shape.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.study import DataError

# Augmentation settings (applied to training items when augment=True).
P_AFFINE = 0.5  # probability of a small rotation + scale (bilinear resampling blurs a little)
MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.85, 1.15)
P_GAMMA, GAMMA_RANGE = 0.3, (0.7, 1.5)  # PET: u ** gamma with u = SUV / suv_max in [0, 1]
P_PET_SCALE, PET_SCALE_RANGE = 0.5, (0.9, 1.1)  # PET: u * s (global uptake calibration)
P_NOISE, NOISE_MAX_STD = 0.3, 0.02  # PET: + N(0, sigma^2), sigma ~ U(0, 0.02) in u units
P_CT_SHIFT, CT_SHIFT_MAX = 0.5, 0.05  # CT: +- 0.05 in [-1, 1] units (50 HU for a 2000 HU window)
_OPEN_MAPS = 64  # memory maps kept open per process (each holds a file descriptor)


def to_model_grid(x: torch.Tensor, img_size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resample (N, C, X, Y) -> (N, C, S, S); identity when X == Y == S.

    mode "bilinear" for images / logits, "nearest" for masks (pixel-centre aligned, i.e.
    torch's "nearest-exact", so that integer up/down-sampling maps back exactly).
    """
    if x.shape[-2:] == (img_size, img_size):
        return x
    return _resize(x, (img_size, img_size), mode)


def from_model_grid(y: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Inverse of to_model_grid: (N, C, S, S) -> (N, C, X, Y) with size = (X, Y)."""
    size = (int(size[0]), int(size[1]))
    if tuple(y.shape[-2:]) == size:
        return y
    return _resize(y, size, mode)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "bilinear":
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    if mode == "nearest":
        return F.interpolate(x.float(), size=size, mode="nearest-exact")
    raise ValueError(f"mode={mode!r}: use 'bilinear' (images) or 'nearest' (masks)")


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy / random / torch in each DataLoader worker from torch's per-worker seed.

    The dataset's samples do not need it (each item has its own rng), but any other
    randomness in a worker (a user's transform) would otherwise repeat across workers."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


class PetCtSliceDataset(torch.utils.data.Dataset):
    """Map-style dataset of `samples_per_epoch` slices drawn from cached studies.

    studies: CachedStudy-like (shape (X, Y, Z), fg_slices, image() (Z, 2, X, Y), mask() (Z, X, Y)).
    Item: (image float32 (C, S, S), mask float32 (1, S, S)), C = 2 * (2 * context_slices + 1).
    """

    def __init__(self, studies: Sequence, *, img_size: int, fg_fraction: float = 0.33,
                 augment: bool = True, context_slices: int = 0, samples_per_epoch: int,
                 seed: int = 0):
        if not studies:
            raise DataError("PetCtSliceDataset got no studies; check the split (train set empty?)")
        if img_size < 1 or samples_per_epoch < 1 or context_slices < 0 or seed < 0:
            raise DataError(f"img_size={img_size}, samples_per_epoch={samples_per_epoch} must "
                            f"be >= 1 and context_slices={context_slices}, seed={seed} >= 0")
        if not 0.0 <= fg_fraction <= 1.0:
            raise DataError(f"fg_fraction={fg_fraction} must be within [0, 1]")
        self.studies = list(studies)
        self.img_size, self.fg_fraction, self.augment = img_size, fg_fraction, augment
        self.context_slices, self.seed = context_slices, seed
        self.samples_per_epoch = samples_per_epoch
        n_slices = np.array([s.shape[2] for s in self.studies], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(n_slices)])  # global slice index of z = 0
        self._fg = np.array([(k, z) for k, s in enumerate(self.studies) for z in s.fg_slices],
                            np.int64).reshape(-1, 2)  # (n_fg_slices, 2): study index, z
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._maps: OrderedDict = OrderedDict()

    @property
    def in_channels(self) -> int:
        return 2 * (2 * self.context_slices + 1)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()  # memory maps are reopened in each process
        return state

    def pick(self, rng: np.random.Generator) -> tuple[int, int]:
        """(study index, z) of one item: a tumour slice with probability fg_fraction."""
        if len(self._fg) and rng.random() < self.fg_fraction:
            k, z = self._fg[rng.integers(len(self._fg))]
            return int(k), int(z)
        g = rng.integers(self._starts[-1])
        k = int(np.searchsorted(self._starts, g, side="right")) - 1
        return k, int(g - self._starts[k])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"item {i} outside 0..{self.samples_per_epoch - 1}")
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        k, z = self.pick(rng)
        image, mask = self._read(k, z)  # (C, X, Y), (1, X, Y)
        if self.augment:
            return augment(image, mask, rng, self.img_size)
        image = to_model_grid(image[None], self.img_size)[0]
        mask = to_model_grid(mask[None], self.img_size, mode="nearest")[0]
        return image, mask

    def _read(self, k: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_map, mask_map = self._open(k)
        c = self.context_slices
        zs = np.clip(np.arange(z - c, z + c + 1), 0, image_map.shape[0] - 1)
        image = np.asarray(image_map[zs], np.float32)  # (2c+1, 2, X, Y): 2c+1 contiguous reads
        image = image.reshape(-1, *image.shape[2:])  # (C, X, Y)
        mask = np.asarray(mask_map[z:z + 1], np.float32)  # (1, X, Y)
        return torch.from_numpy(image), torch.from_numpy(mask)

    def _open(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps of study k, from a small per-process LRU (opening costs ~0.15 ms)."""
        if k in self._maps:
            self._maps.move_to_end(k)
            return self._maps[k]
        maps = (self.studies[k].image(), self.studies[k].mask())
        self._maps[k] = maps
        if len(self._maps) > _OPEN_MAPS:
            self._maps.popitem(last=False)
        return maps


def augment(image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator,
            img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation/scale (resampled straight to S x S), flips, rot90, intensity jitter.

    image (C, X, Y) in [-1, 1] with CT on even and PET on odd channels; mask (1, X, Y) in {0, 1}.
    Returns (C, S, S), (1, S, S). Geometry is shared by image and mask (nearest for the mask,
    so it stays binary); everything is drawn from `rng`.
    """
    if rng.random() < P_AFFINE:
        angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        zoom = 1.0 / rng.uniform(*SCALE_RANGE)  # sampling grid shrinks when the content grows
        cos, sin = zoom * math.cos(angle), zoom * math.sin(angle)
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])  # (1, 2, 3)
        grid = F.affine_grid(theta, [1, 1, img_size, img_size], align_corners=False)
        # pad with -1 (air, zero uptake) by shifting to [0, 2] around zeros padding
        image = F.grid_sample(image[None] + 1.0, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)[0] - 1.0
        mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros",
                             align_corners=False)[0]
    else:
        image = to_model_grid(image[None], img_size)[0]
        mask = to_model_grid(mask[None], img_size, mode="nearest")[0]

    flips = [d for d in (1, 2) if rng.random() < 0.5]
    if flips:
        image, mask = torch.flip(image, flips), torch.flip(mask, flips)
    k = int(rng.integers(4))
    if k:
        image, mask = torch.rot90(image, k, (1, 2)), torch.rot90(mask, k, (1, 2))

    image = image.contiguous()
    pet = (image[1::2] + 1.0) * 0.5  # (C/2, S, S) u = SUV / suv_max in [0, 1]
    if rng.random() < P_GAMMA:
        pet = pet.clamp_(min=0.0) ** float(np.exp(rng.uniform(*np.log(GAMMA_RANGE))))
    if rng.random() < P_PET_SCALE:
        pet = pet * float(rng.uniform(*PET_SCALE_RANGE))
    if rng.random() < P_NOISE:
        sigma = rng.uniform(0.0, NOISE_MAX_STD)
        pet = pet + sigma * torch.from_numpy(rng.standard_normal(pet.shape, np.float32))
    image[1::2] = pet.clamp(0.0, 1.0) * 2.0 - 1.0
    if rng.random() < P_CT_SHIFT:
        shift = float(rng.uniform(-CT_SHIFT_MAX, CT_SHIFT_MAX))
        image[0::2] = (image[0::2] + shift).clamp(-1.0, 1.0)
    return image, mask.contiguous()
