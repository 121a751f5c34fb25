"""2-D (or 2.5-D) slice dataset over cached studies, with foreground oversampling.

    train_set = PetCtSliceDataset(cached_train, img_size=128, samples_per_epoch=960, seed=0)
    loader = DataLoader(train_set, batch_size=16, num_workers=2, worker_init_fn=worker_init_fn)
    for epoch in range(epochs):
        train_set.set_epoch(epoch)
        for image, mask in loader: ...        # (16, C, 128, 128), (16, 1, 128, 128)

    aux_set = PetCtSliceDataset(cached_train, img_size=128, samples_per_epoch=960,
                                aux_target="organs", aux_classes=N_ORGAN_CLASSES)
    for image, mask, aux in loader: ...       # + aux (16, 128, 128) int64 class indices

Auxiliary targets (`aux_target`, for a second output head; item = (image, mask, aux)):
- "none" (default): items are (image, mask), exactly as without the option.
- "organs": the study's organ labels (cache organs.npy; every study must have them), classes
  0 .. aux_classes - 1 (default: max label over the studies + 1; pass it explicitly so that
  the model head does not depend on which studies are in the training set).
- "uptake": 1 where SUV > uptake_suv and not tumour, else 0 (data/targets.py, the DEEP-PSMA
  baseline's physiological-uptake class), computed from the cached PET channel of the centre
  slice before any intensity augmentation; aux_classes = 2.
The aux target goes through the same geometric augmentation as the mask (nearest).

Sampling (nnU-Net's foreground oversampling, default share 1/3): with probability
`fg_fraction` an item is a slice that contains tumour, uniform over all tumour slices of all
studies; otherwise a slice uniform over all slices of all studies (tumour slices included,
so the expected tumour-slice share is fg_fraction + (1 - fg_fraction) * natural share).
If no study has tumour, every item is drawn uniformly.
`hot_fraction` (default 0 = off) adds a third kind of item, hard negatives that need no labels:
with probability `hot_fraction` an item is a tumour-free slice with physiological uptake, one
whose PET exceeds `uptake_suv` somewhere (the uptake target's definition, data/targets.py),
uniform over all such slices of all studies; the uniform share shrinks to
1 - fg_fraction - hot_fraction. The false positives of short runs sit on this uptake (urinary
tract, brown fat: README); a uniform draw lands on such a slice only in proportion to how many
there are (about half the tumour-free slices of the phantom at SUV 3). With hot_fraction 0 the
draws are exactly those without the option.
`fg_sampling="lesion"` draws the tumour items lesion by lesion instead: a lesion uniform over
all lesions (18-connected components of the 3-D masks) of all studies, then a slice uniform
over the slices it spans. Slice-uniform sampling sees a lesion in proportion to its axial
extent, so a 10 ml lesion over 7 slices is drawn ~3x as often as a 0.3 ml one over 2; lesion
sampling gives every lesion the same share, the small ones that lesion recall counts as much
as the large ones included. (In patch mode the crop still centres on a tumour voxel of the
slice drawn uniformly, which can belong to another lesion of the same slice.)

Determinism: item i of epoch e is built only from `np.random.default_rng([seed, e, i])`
(slice choice and augmentation alike), so a batch does not depend on the number of workers,
on their order or on resuming mid-run. The epoch lives in shared memory, so `set_epoch` also
reaches persistent DataLoader workers.

Channels: C = 2 * (2 * context_slices + 1): (CT, PET) of slices z - c, ..., z + c, clamped at
the ends of the volume; the centre slice is channels [2c, 2c + 1].

In-plane handling (`inplane`):
- "resize" (default): slices of any in-plane size are resampled to S x S with `to_model_grid`
  (bilinear for images, nearest for masks); `from_model_grid` maps predictions back.
  Non-square slices are stretched to the square grid (and stretched back): simple and exactly
  invertible in shape, but a 400² autoPET slice at 2.04 mm becomes 3.6 mm pixels at S = 224.
- "patch": an item is an S x S crop of the slice at its own (cached) resolution, the way the
  autoPET winners train (nnU-Net patches at the native spacing; inference then tiles the slice
  with a sliding window, `inference.predict_volume_sliding`). Where the crop lies is drawn from
  its own stream `default_rng([seed, e, i, 2])` (so the slice choice and every augmentation draw
  are those of resize mode): a tumour item (one of the `fg_fraction` share) is placed around a
  tumour voxel of its slice drawn uniformly, that voxel at offset S/2 + U{-S/4..S/4} from the
  crop's start on each axis (inside the crop's central half, not always at its centre), the
  crop then shifted to lie inside the slice where the slice is larger than S; any other item at
  a uniform position. A slice smaller than S is padded with -1 (air / no uptake in the cached
  normalisation; 0 for the mask and aux labels), its position in the crop uniform too.
  Geometry, intensity augmentation, aux targets and misalignment are those of resize mode: the
  rotation / scale is one `affine_grid` + `grid_sample` over the whole slice (translation to
  the crop centre, scale S / slice size), so a rotated crop takes real tissue from beyond its
  edges instead of padding; without it the crop is an exact copy of the cached values.

PET/CT misalignment (`p_misalign`, default 0 = off; the autoPET III winner, LesionTracer,
Rokuss et al. 2024, used p = 0.1): with probability p the CT channels alone are rotated by
U(-5, 5) degrees and shifted by U(-4, 4) mm along each in-plane axis (converted to pixels with
the study's spacing), before the shared augmentation, so the network does not rely on a
perfect PET/CT registration. It is drawn from its own stream `default_rng([seed, e, i, 1])`:
turning it on changes nothing else in an item.
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
from data.targets import UPTAKE_SUV, suv_from_channel, uptake_from_channel, uptake_target

# Augmentation settings (applied to training items when augment=True).
P_AFFINE = 0.5  # probability of a small rotation + scale (bilinear resampling blurs a little)
MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.85, 1.15)
P_GAMMA, GAMMA_RANGE = 0.3, (0.7, 1.5)  # PET: u ** gamma with u = SUV / suv_max in [0, 1]
P_PET_SCALE, PET_SCALE_RANGE = 0.5, (0.9, 1.1)  # PET: u * s (global uptake calibration)
P_NOISE, NOISE_MAX_STD = 0.3, 0.02  # PET: + N(0, sigma^2), sigma ~ U(0, 0.02) in u units
P_CT_SHIFT, CT_SHIFT_MAX = 0.5, 0.05  # CT: +- 0.05 in [-1, 1] units (50 HU for a 2000 HU window)
MISALIGN_MAX_MM, MISALIGN_MAX_DEG = 4.0, 5.0  # CT vs PET: shift per axis, rotation (p_misalign)
AUX_TARGETS = ("none", "organs", "uptake")
INPLANE_MODES = ("resize", "patch")
FG_SAMPLING = ("slice", "lesion")
PAD_VALUE = -1.0  # image value outside a slice: CT at the window's lower bound (air), SUV 0
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

    studies: CachedStudy-like (shape (X, Y, Z), fg_slices, image() (Z, 2, X, Y), mask() (Z, X, Y);
      for aux_target="organs" also has_organs, max_organ_label, organs() (Z, X, Y); spacing for
      p_misalign; suv_max for "uptake" and hot_fraction).
    Item: (image float32 (C, S, S), mask float32 (1, S, S)), C = 2 * (2 * context_slices + 1);
    with aux_target "organs" / "uptake": (image, mask, aux int64 (S, S) class indices in
    0 .. aux_classes - 1).
    aux_classes: "organs": number of organ classes (None: max label over the studies + 1);
      "uptake": 2 (None gives 2); "none": ignored, `self.aux_classes` is 0.
    uptake_suv: threshold of the uptake target (and of the hot slices) in SUV; suv_max: the
      cache's SUV clip (None: read from the studies, which record it).
    hot_fraction: share of hard-negative items, tumour-free slices with PET above uptake_suv
      (module docstring); fg_fraction + hot_fraction <= 1.
    p_misalign: probability of the CT-only misalignment augmentation (module docstring).
    inplane: "resize" (slices resampled to S x S) or "patch" (S x S crops at the cached
      resolution; module docstring). Items have the same shapes in both modes.
    """

    def __init__(self, studies: Sequence, *, img_size: int, fg_fraction: float = 0.33,
                 augment: bool = True, context_slices: int = 0, samples_per_epoch: int,
                 seed: int = 0, aux_target: str = "none", aux_classes: int | None = None,
                 uptake_suv: float = UPTAKE_SUV, suv_max: float | None = None,
                 p_misalign: float = 0.0, inplane: str = "resize", fg_sampling: str = "slice",
                 hot_fraction: float = 0.0):
        if not studies:
            raise DataError("PetCtSliceDataset got no studies; check the split (train set empty?)")
        if img_size < 1 or samples_per_epoch < 1 or context_slices < 0 or seed < 0:
            raise DataError(f"img_size={img_size}, samples_per_epoch={samples_per_epoch} must "
                            f"be >= 1 and context_slices={context_slices}, seed={seed} >= 0")
        if not 0.0 <= fg_fraction <= 1.0:
            raise DataError(f"fg_fraction={fg_fraction} must be within [0, 1]")
        if hot_fraction < 0.0 or fg_fraction + hot_fraction > 1.0 + 1e-9:
            raise DataError(f"hot_fraction={hot_fraction} must be within [0, 1 - fg_fraction = "
                            f"{1.0 - fg_fraction:g}]: the two shares and the uniform one add up to 1")
        if not 0.0 <= p_misalign <= 1.0:
            raise DataError(f"p_misalign={p_misalign} must be within [0, 1]")
        if fg_sampling not in FG_SAMPLING:
            raise DataError(f"fg_sampling={fg_sampling!r}: use one of {', '.join(FG_SAMPLING)}")
        if inplane not in INPLANE_MODES:
            raise DataError(f"inplane={inplane!r}: use one of {', '.join(INPLANE_MODES)}")
        self.inplane = inplane
        self.studies = list(studies)
        self.aux_target, self.p_misalign = aux_target, p_misalign
        self.aux_classes = _aux_classes(self.studies, aux_target, aux_classes)
        self.uptake_suv = uptake_suv
        needs_suv = aux_target == "uptake" or hot_fraction > 0
        self.suv_max = _suv_max(self.studies, suv_max, uptake_suv) if needs_suv else suv_max
        self.hot_fraction = hot_fraction
        self.img_size, self.fg_fraction, self.augment = img_size, fg_fraction, augment
        self.context_slices, self.seed = context_slices, seed
        self.samples_per_epoch = samples_per_epoch
        n_slices = np.array([s.shape[2] for s in self.studies], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(n_slices)])  # global slice index of z = 0
        self._fg = np.array([(k, z) for k, s in enumerate(self.studies) for z in s.fg_slices],
                            np.int64).reshape(-1, 2)  # (n_fg_slices, 2): study index, z
        self.fg_sampling = fg_sampling
        # lesion mode: (n_lesions, 3) study index, first z, last z of each lesion
        self._lesions = lesion_extents(self.studies) if fg_sampling == "lesion" else None
        # hot_fraction > 0: (n_hot_slices, 2) study index, z of the tumour-free slices with uptake
        self._hot = (hot_slices(self.studies, self.suv_max, uptake_suv) if hot_fraction > 0
                     else np.zeros((0, 2), np.int64))
        if hot_fraction > 0 and not len(self._hot):
            raise DataError(f"hot_fraction={hot_fraction}: no tumour-free slice of the "
                            f"{len(self.studies)} training studies has PET above uptake_suv="
                            f"{uptake_suv} SUV; lower uptake_suv or set hot_fraction=0")
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
        """(study index, z) of one item: a tumour slice with probability fg_fraction, a hot
        tumour-free slice with probability hot_fraction."""
        return self._pick(rng)[:2]

    def _pick(self, rng: np.random.Generator) -> tuple[int, int, str]:
        """(study index, z, kind): kind "tumour", "hot" or "any" (uniform). The draws of `pick`:
        two per item (three for a lesion-mode tumour item); the same as without hot_fraction
        when it is 0."""
        hot = self.hot_fraction > 0
        if len(self._fg) or hot:
            r = rng.random()
            fg = self.fg_fraction if len(self._fg) else 0.0
            if r < fg:
                if self._lesions is not None:  # a lesion, then one of its slices (three draws)
                    k, z0, z1 = self._lesions[rng.integers(len(self._lesions))]
                    return int(k), int(z0 + rng.integers(z1 - z0 + 1)), "tumour"
                k, z = self._fg[rng.integers(len(self._fg))]
                return int(k), int(z), "tumour"
            if hot and r < fg + self.hot_fraction:
                k, z = self._hot[rng.integers(len(self._hot))]
                return int(k), int(z), "hot"
        g = rng.integers(self._starts[-1])
        k = int(np.searchsorted(self._starts, g, side="right")) - 1
        return k, int(g - self._starts[k]), "any"

    def crop_start(self, i: int, region: np.ndarray, centred: bool) -> tuple[int, int]:
        """Patch mode: (x0, y0), the crop's first pixel in slice coordinates (negative along an
        axis where the slice is smaller than the patch), for item i of the current epoch.

        region (X, Y) of the item's slice: its tumour mask for a tumour item, its uptake map for
        a hot item (`_crop_region`); only its shape matters when not centred. Drawn from
        `default_rng([seed, epoch, i, 2])`:
        centred item: a voxel c uniform over the region's nonzero voxels, per axis
          x0 = clip(c - S // 2 + U{-S // 4 .. S // 4}, lo, hi), so c lies in the crop;
        other item: x0 = U{lo .. hi};  lo = min(0, X - S), hi = max(0, X - S).
        """
        size = self.img_size
        rng = np.random.default_rng([self.seed, self.epoch, int(i), 2])
        bounds = [(min(0, n - size), max(0, n - size)) for n in region.shape]
        if centred:
            xs, ys = np.nonzero(region)
            if len(xs):
                j = rng.integers(len(xs))
                starts = []
                for c, (lo, hi) in zip((xs[j], ys[j]), bounds):
                    offset = rng.integers(-(size // 4), size // 4 + 1)
                    starts.append(int(np.clip(c - size // 2 + offset, lo, hi)))
                return starts[0], starts[1]
        return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in bounds)

    def _crop_region(self, kind: str, image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """What a patch-mode crop centres on: the tumour mask (X, Y) of a tumour item, the uptake
        map (PET of the centre slice above uptake_suv, not tumour) of a hot item; the mask
        (shape only) otherwise."""
        if kind == "hot":
            pet = image[2 * self.context_slices + 1].numpy()
            return uptake_from_channel(pet, mask[0].numpy(), self.suv_max, self.uptake_suv)
        return mask[0].numpy()

    def locate(self, i: int) -> tuple[int, int, tuple[int, int] | None]:
        """(study index, z, crop start or None in resize mode) of item i of the current epoch:
        where the item comes from, without building it."""
        k, z, kind = self._pick(np.random.default_rng([self.seed, self.epoch, int(i)]))
        if self.inplane != "patch":
            return k, z, None
        if kind == "hot":  # the uptake map needs the PET; any other item only the mask
            region = self._crop_region(kind, *self._read(k, z))
        else:
            region = np.asarray(self._open(k)[1][z])
        return k, z, self.crop_start(i, region, kind != "any")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"item {i} outside 0..{self.samples_per_epoch - 1}")
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        k, z, kind = self._pick(rng)
        image, mask = self._read(k, z)  # (C, X, Y), (1, X, Y)
        aux = self._read_aux(k, z, image, mask)  # (X, Y) int64 or None
        crop = (self.crop_start(i, self._crop_region(kind, image, mask), kind != "any")
                if self.inplane == "patch" else None)
        if self.augment:
            if self.p_misalign > 0:
                rng_misalign = np.random.default_rng([self.seed, self.epoch, int(i), 1])
                image = misalign_ct(image, self.studies[k].spacing[:2], rng_misalign, self.p_misalign)
            return augment(image, mask, rng, self.img_size, aux=aux, crop=crop)
        if crop is not None:
            image = crop_or_pad(image, crop, self.img_size, PAD_VALUE)
            mask = crop_or_pad(mask, crop, self.img_size, 0.0)
            if aux is None:
                return image, mask
            return image, mask, crop_or_pad(aux[None], crop, self.img_size, 0)[0]
        image = to_model_grid(image[None], self.img_size)[0]
        mask = to_model_grid(mask[None], self.img_size, mode="nearest")[0]
        if aux is None:
            return image, mask
        aux = to_model_grid(aux[None, None].float(), self.img_size, mode="nearest")[0, 0]
        return image, mask, aux.long()

    def _read_aux(self, k: int, z: int, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The aux target of slice z of study k, int64 (X, Y); None for aux_target "none"."""
        if self.aux_target == "organs":
            return torch.from_numpy(np.asarray(self._open(k)[2][z], np.int64))
        if self.aux_target == "uptake":
            pet = image[2 * self.context_slices + 1].numpy()  # the centre slice's PET channel
            hot = uptake_from_channel(pet, mask[0].numpy(), self.suv_max, self.uptake_suv)
            return torch.from_numpy(hot.astype(np.int64))
        return None

    def _read(self, k: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_map, mask_map, _ = self._open(k)
        c = self.context_slices
        zs = np.clip(np.arange(z - c, z + c + 1), 0, image_map.shape[0] - 1)
        image = np.asarray(image_map[zs], np.float32)  # (2c+1, 2, X, Y): 2c+1 contiguous reads
        image = image.reshape(-1, *image.shape[2:])  # (C, X, Y)
        mask = np.asarray(mask_map[z:z + 1], np.float32)  # (1, X, Y)
        return torch.from_numpy(image), torch.from_numpy(mask)

    def _open(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Memory maps (image, mask, organs or None) of study k, from a small per-process LRU
        (opening costs ~0.15 ms)."""
        if k in self._maps:
            self._maps.move_to_end(k)
            return self._maps[k]
        study = self.studies[k]
        maps = (study.image(), study.mask(), study.organs() if self.aux_target == "organs" else None)
        self._maps[k] = maps
        if len(self._maps) > _OPEN_MAPS:
            self._maps.popitem(last=False)
        return maps


def lesion_extents(studies: Sequence) -> np.ndarray:
    """(n_lesions, 3) int64: study index, first z, last z of every 18-connected tumour component
    of every study (mask() (Z, X, Y)). A connected component occupies every slice between its
    first and last (a step between neighbours changes z by at most 1), so its bounding box's
    z range is exactly the slices it spans."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 2)  # 18-connected: the evaluation's lesions
    rows = []
    for k, study in enumerate(studies):
        if not len(study.fg_slices):
            continue
        labels, _ = ndimage.label(np.asarray(study.mask()) > 0, structure=structure)
        rows += [(k, box[0].start, box[0].stop - 1) for box in ndimage.find_objects(labels)
                 if box is not None]
    return np.array(rows, np.int64).reshape(-1, 3)


def hot_slices(studies: Sequence, suv_max: float, uptake_suv: float = UPTAKE_SUV) -> np.ndarray:
    """(n, 2) int64: study index, z of every tumour-free slice whose cached PET exceeds
    `uptake_suv` somewhere (strictly, as `data.targets.uptake_target`), in study and z order:
    the slices `hot_fraction` draws from. Reads each study's PET channel once (image() (Z, 2,
    X, Y)); the tumour slices are the cache's `fg_slices`."""
    rows = []
    for k, study in enumerate(studies):
        image = study.image()
        pet_max = np.concatenate([  # a few slices at a time: bounded memory
            np.asarray(image[z0:z0 + 64, 1], np.float32).max(axis=(1, 2))
            for z0 in range(0, image.shape[0], 64)])
        hot = uptake_target(suv_from_channel(pet_max, suv_max), None, uptake_suv) > 0
        hot[list(study.fg_slices)] = False
        rows += [(k, int(z)) for z in np.flatnonzero(hot)]
    return np.array(rows, np.int64).reshape(-1, 2)


def _aux_classes(studies: list, aux_target: str, aux_classes: int | None) -> int:
    """Number of aux classes for `aux_target`, checked against the studies (DataError naming the
    first study that does not fit, and the fix)."""
    if aux_target not in AUX_TARGETS:
        raise DataError(f"aux_target={aux_target!r}: use one of {', '.join(AUX_TARGETS)}")
    if aux_target == "none":
        return 0
    if aux_target == "uptake":
        if aux_classes not in (None, 2):
            raise DataError(f"aux_classes={aux_classes} with aux_target='uptake': the uptake "
                            f"target has 2 classes (0 = other, 1 = hot non-tumour); pass 2 or None")
        return 2
    lacking = next((s for s in studies if not getattr(s, "has_organs", False)), None)
    if lacking is not None:
        raise DataError(f"study {lacking.case_id} ({lacking.source}) has no organ labels, which "
                        f"aux_target='organs' needs; add ORGANS.nii.gz to its study folder "
                        f"(nnU-Net: organsTr/<case>.nii.gz, PNG: <case>/organs/<z>.png) and "
                        f"rebuild the cache, or use --aux_target=uptake / none")
    top = max(s.max_organ_label for s in studies)
    if aux_classes is None:
        return top + 1
    over = next((s for s in studies if s.max_organ_label >= aux_classes), None)
    if aux_classes < 2 or over is not None:
        found = f"; study {over.case_id} ({over.source}) has label {over.max_organ_label}" if over else ""
        raise DataError(f"aux_classes={aux_classes}: organ labels must lie in 0..aux_classes - 1 "
                        f"(and aux_classes >= 2){found}; pass the number of organ classes = the "
                        f"largest label + 1 ({top + 1} for these studies)")
    return int(aux_classes)


def _suv_max(studies: list, suv_max: float | None, uptake_suv: float) -> float:
    """The cache's SUV clip for the uptake target: `suv_max` if given, else what the studies
    record; DataError when they disagree or the threshold is not below it."""
    recorded = {float(s.suv_max) for s in studies if getattr(s, "suv_max", None) is not None}
    if suv_max is None:
        if len(recorded) != 1:
            raise DataError(f"aux_target='uptake' and hot_fraction need the cache's suv_max (the studies record "
                            f"{sorted(recorded) or 'none'}); pass suv_max=<the value used by prepare_cache>")
        suv_max = recorded.pop()
    elif recorded - {float(suv_max)}:
        raise DataError(f"suv_max={suv_max} differs from the cache's {sorted(recorded)}; pass the "
                        f"suv_max the cache was built with (or None to read it from the cache)")
    if not 0 < uptake_suv < suv_max:
        raise DataError(f"uptake_suv={uptake_suv} must lie in (0, suv_max={suv_max}): the cached "
                        f"PET is clipped at suv_max")
    return float(suv_max)


def rotate_shift(x: torch.Tensor, spacing: Sequence[float], angle_deg: float,
                 shift_mm: Sequence[float], fill: float = -1.0) -> torch.Tensor:
    """Rotate (about the slice centre) and shift (C, X, Y) slices in physical units, bilinear.

    spacing (sx, sy) mm per pixel along X and Y; shift_mm (dx, dy). Output pixel at physical
    position p (mm from the centre) takes the input at R(angle) p + (dx, dy), so content moves
    by -(dx, dy). In torch's normalised grid coordinates (order Y, X; align_corners=False) with
    D = diag(Y * sy / 2, X * sx / 2): theta = [D^-1 R D | D^-1 (dy, dx)]. Outside: `fill`.
    """
    nx, ny = x.shape[-2:]
    half = torch.tensor([ny * float(spacing[1]) / 2, nx * float(spacing[0]) / 2], dtype=torch.float64)
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    theta = torch.empty(1, 2, 3, dtype=torch.float64)
    theta[0, :, :2] = rot * half[None, :] / half[:, None]  # D^-1 R D
    theta[0, :, 2] = torch.tensor([float(shift_mm[1]), float(shift_mm[0])], dtype=torch.float64) / half
    grid = F.affine_grid(theta.float(), [1, x.shape[0], nx, ny], align_corners=False)
    out = F.grid_sample(x[None] - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] + fill


def misalign_ct(image: torch.Tensor, spacing: Sequence[float], rng: np.random.Generator,
                p: float) -> torch.Tensor:
    """With probability p, rotate the CT channels (even) by U(-5, 5) degrees and shift them by
    U(-4, 4) mm per in-plane axis (`rotate_shift`, air outside); PET channels untouched.
    image (C, X, Y) in [-1, 1]; spacing (sx, sy) in mm. Returns a new tensor or `image`."""
    if rng.random() >= p:
        return image
    angle = rng.uniform(-MISALIGN_MAX_DEG, MISALIGN_MAX_DEG)
    shift = rng.uniform(-MISALIGN_MAX_MM, MISALIGN_MAX_MM, size=2)
    image = image.clone()
    image[0::2] = rotate_shift(image[0::2], spacing, angle, shift, fill=-1.0).clamp(-1.0, 1.0)
    return image


def crop_or_pad(x: torch.Tensor, start: Sequence[int], size: int, fill: float) -> torch.Tensor:
    """(C, X, Y) -> (C, S, S): out[:, a, b] = x[:, x0 + a, y0 + b] where that pixel exists, else
    `fill` (start = (x0, y0) may be negative or run past the slice). Exact copy, no resampling."""
    out = torch.full((x.shape[0], size, size), fill, dtype=x.dtype)
    src, dst = [], []
    for begin, n in zip(start, x.shape[-2:]):
        lo, hi = max(begin, 0), min(begin + size, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - begin, max(lo, hi) - begin))
    out[:, dst[0], dst[1]] = x[:, src[0], src[1]]
    return out


def affine_theta(angle: float, zoom: float, size: int, crop: Sequence[int] | None = None,
                 slice_shape: Sequence[int] | None = None) -> torch.Tensor:
    """(1, 2, 3) `F.affine_grid` matrix (align_corners=False; rows = input W (Y) then H (X)
    coordinate) of a rotation by `angle` (radians) with sampling-grid scale `zoom`.

    crop None (resize mode): about the slice centre, output S x S spanning the whole slice
      (a non-square slice is stretched): theta = [zoom R | 0], R = [[cos, -sin], [sin, cos]].
    crop = (x0, y0) with slice_shape (X, Y) (patch mode): about the centre c = (x0 + S/2,
      y0 + S/2) of the S x S crop, in slice pixels; the normalised input coordinate of a pixel
      p is u = (2p + 1) / n - 1, so the crop [x0, x0 + S) of an n-pixel axis is u = (S / n) v +
      (2 c / n - 1) for v in [-1, 1]:
        theta = [diag(S / Y, S / X) zoom R | (2 c_y / Y - 1, 2 c_x / X - 1)],
      one pixel of the output = one pixel of the slice (rigid in pixels, X != Y included).
    """
    cos, sin = zoom * math.cos(angle), zoom * math.sin(angle)
    if crop is None:
        return torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])  # (1, 2, 3)
    nx, ny = slice_shape
    cx, cy = crop[0] + size / 2.0, crop[1] + size / 2.0
    sx, sy = size / nx, size / ny
    return torch.tensor([[[sy * cos, -sy * sin, 2.0 * cy / ny - 1.0],
                          [sx * sin, sx * cos, 2.0 * cx / nx - 1.0]]])


def augment(image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator,
            img_size: int, aux: torch.Tensor | None = None,
            crop: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Random rotation/scale (resampled straight to S x S), flips, rot90, intensity jitter.

    image (C, X, Y) in [-1, 1] with CT on even and PET on odd channels; mask (1, X, Y) in {0, 1};
    aux (X, Y) int64 class indices or None. crop None: the whole slice to S x S (resize mode);
    crop (x0, y0): the S x S window of the slice starting there, at the slice's resolution
    (patch mode; `affine_theta`, `crop_or_pad`).
    Returns (C, S, S), (1, S, S) [, aux (S, S) int64]. Geometry is shared by image, mask and aux
    (nearest for mask and aux, so labels stay labels); everything is drawn from `rng`, the
    same draws with or without aux and in either mode.
    """
    labels = mask if aux is None else torch.cat([mask, aux[None].float()])  # (1 or 2, X, Y)
    if rng.random() < P_AFFINE:
        angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        zoom = 1.0 / rng.uniform(*SCALE_RANGE)  # sampling grid shrinks when the content grows
        theta = affine_theta(angle, zoom, img_size, crop, image.shape[-2:])  # (1, 2, 3)
        grid = F.affine_grid(theta, [1, 1, img_size, img_size], align_corners=False)
        # pad with -1 (air, zero uptake) by shifting to [0, 2] around zeros padding
        image = F.grid_sample(image[None] + 1.0, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)[0] - 1.0
        labels = F.grid_sample(labels[None], grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[0]
    elif crop is not None:
        image = crop_or_pad(image, crop, img_size, PAD_VALUE)
        labels = crop_or_pad(labels, crop, img_size, 0.0)
    else:
        image = to_model_grid(image[None], img_size)[0]
        labels = to_model_grid(labels[None], img_size, mode="nearest")[0]

    flips = [d for d in (1, 2) if rng.random() < 0.5]
    if flips:
        image, labels = torch.flip(image, flips), torch.flip(labels, flips)
    k = int(rng.integers(4))
    if k:
        image, labels = torch.rot90(image, k, (1, 2)), torch.rot90(labels, k, (1, 2))
    mask = labels[:1]

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
    if aux is None:
        return image, mask.contiguous()
    return image, mask.contiguous(), labels[1].round().long()
