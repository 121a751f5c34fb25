"""Preprocess studies once into a memory-mapped cache, one study at a time.

    cache = prepare_cache(find_studies("/data/autoPET"), "cache")   # list[CachedStudy]
    image = cache[0].image()        # (Z, 2, X, Y) float16 memory map, nothing read yet
    slice_z = np.asarray(image[40]) # (2, X, Y): one contiguous read

Layout: `cache_dir/<key>/<case_id>-<source>/{image.npy, mask.npy, meta.json}` (+ `organs.npy`,
uint8 (Z, X, Y), when the study has organ labels). `<key>` is a short hash of the preprocessing
parameters and FORMAT_VERSION, so changing `ct_window` or `suv_max` writes a new cache beside
the old one. `<source>` is a short hash of the study's source fingerprint (absolute paths,
sizes and modification times of its files for a StudyRef; an array hash for an in-memory
Study), so two sources never share a folder, even with the same case id (the phantoms of two
sizes, another data folder, a folder of new studies to predict), and a source that changed
gets a new folder while the old copy stays for the runs that used it. An unchanged source is
found without being read. Each study's meta.json records its fingerprint and `content_hash`,
a hash of the bytes of its cached arrays: a run records the hashes of its studies, and
evaluation refuses a study whose cached bytes differ from the ones the run saw.

In-plane resampling (`target_spacing`, for patch-mode training; None = the native grid): each
study's CT / PET (linear) and mask / organ labels (nearest) are resampled ONCE, before the
normalisation, onto the grid of in-plane spacing `target_spacing` mm over the same field of
view (`data.geometry.inplane_grid`; z untouched). It is part of the cache key (another folder),
and the CachedStudy's shape / spacing / affine / fg_slices are those of the resampled grid; its
`original_shape` / `original_affine` keep the study's own grid, and `to_original(volume)` maps
a volume (e.g. probabilities, linear) back onto it for scoring and for the written masks. The
file layout is unchanged (meta.json gains those keys), so FORMAT_VERSION stays.

Intensities (both channels in [-1, 1], stored as float16: ~3 significant digits, i.e. ~1 HU
over a 2000 HU window and ~0.01 SUV at suv_max = 20, far below CT and PET noise):
    ch0 = 2 * (clip(CT, lo, hi) - lo) / (hi - lo) - 1          (ct_window = (lo, hi) in HU)
    ch1 = 2 * clip(SUV, 0, suv_max) / suv_max - 1

Why Z-major (Z, 2, X, Y): training reads one axial slice (both channels) at a time, and in
C order that slice is one contiguous block of the file, so a random slice costs one
sequential read from the memory map instead of X*Y scattered 2-byte reads of an (X, Y, Z)
array. The mask is (Z, X, Y) for the same reason.

Peak memory is one study: each is loaded, normalised in blocks of slices straight into the
output file, and dropped before the next one is read. A study is written into a temporary
folder and renamed into place, so an interrupted run never leaves a half-written study.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from data.study import DataError, Study, StudyRef

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the file layout or the intensity formulas change (2: organs.npy)
_BLOCK = 16  # slices normalised at once: bounds the temporaries to a few MB per channel


@dataclass
class CachedStudy:
    """One preprocessed study in the cache (metadata only; arrays are memory-mapped on demand).

    shape: (X, Y, Z) of the cached grid (the source grid unless `target_spacing` resampled it);
    spacing in mm (X, Y, Z); affine (4, 4) voxel -> world as nested lists (JSON); fg_slices: z
    indices whose mask has at least one tumour voxel. original_shape / original_affine: the
    source grid of a resampled study (None otherwise).
    has_organs: the study has organ labels (`organs()`); max_organ_label: their largest value
    (0 without); suv_max: the SUV clip of the PET channel (ch1 = 2 clip(SUV, 0, suv_max) /
    suv_max - 1), None for caches written before it was recorded.
    """

    case_id: str
    patient_id: str
    source: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list
    has_tumor: bool
    has_mask: bool
    fg_slices: list[int]
    directory: str
    has_organs: bool = False
    max_organ_label: int = 0
    suv_max: float | None = None
    content_hash: str | None = None  # blake2b of the cached arrays' bytes (None: older caches)
    ref: dict | None = None  # the StudyRef it was read from (None for an in-memory Study)
    # with target_spacing: the study's own grid before the in-plane resampling (None: not resampled)
    original_shape: tuple[int, int, int] | None = None
    original_affine: list | None = None
    target_spacing: float | None = None

    @property
    def resampled(self) -> bool:
        """True when the cache holds the study on another in-plane grid than its files."""
        return self.original_shape is not None

    def to_original(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """A volume (X, Y, Z) on the cache grid -> (X0, Y0, Z) float32 on the study's original
        grid (order 1: linear, for probabilities; 0: nearest, for labels); unchanged when the
        study was not resampled. Every original voxel centre lies inside the cache grid
        (`inplane_grid` rounds the voxel count up), so nothing is filled in."""
        if not self.resampled:
            return volume
        from data.geometry import resample_to_grid  # scipy only when something is resampled

        return resample_to_grid(volume, np.asarray(self.affine), np.asarray(self.original_affine),
                                tuple(self.original_shape), order=order, cval=0.0)

    def study_ref(self) -> StudyRef | None:
        """The StudyRef this study was read from, to read its original files again."""
        return None if self.ref is None else StudyRef(
            self.ref["case_id"], self.ref["patient_id"], self.ref["layout"],
            dict(self.ref["paths"]), dict(self.ref.get("series_uids", {})))

    def image(self) -> np.ndarray:
        """Read-only memory map, float16 (Z, 2, X, Y): channel 0 CT, channel 1 SUV, in [-1, 1]."""
        return np.load(Path(self.directory) / "image.npy", mmap_mode="r")

    def mask(self) -> np.ndarray:
        """Read-only memory map, uint8 (Z, X, Y) in {0, 1} (all zeros when has_mask is False)."""
        return np.load(Path(self.directory) / "mask.npy", mmap_mode="r")

    def organs(self) -> np.ndarray:
        """Read-only memory map, uint8 (Z, X, Y) organ labels; DataError when has_organs is False."""
        if not self.has_organs:
            raise DataError(f"study {self.case_id} ({self.source}) has no organ labels; add "
                            f"ORGANS.nii.gz (or organsTr/<case>.nii.gz) and rebuild the cache")
        return np.load(Path(self.directory) / "organs.npy", mmap_mode="r")


def cache_params(ct_window: tuple[float, float], suv_max: float,
                 target_spacing: float | None = None) -> dict:
    """The preprocessing parameters that define a cache folder (target_spacing only when set,
    so the caches written before it existed keep their key)."""
    params = {"format": FORMAT_VERSION, "ct_window": [float(v) for v in ct_window],
              "suv_max": float(suv_max)}
    if target_spacing is not None:
        params["target_spacing"] = float(target_spacing)
    return params


def cache_key(ct_window: tuple[float, float], suv_max: float,
              target_spacing: float | None = None) -> str:
    """Short hash of the preprocessing parameters and FORMAT_VERSION (the cache sub-folder)."""
    params = cache_params(ct_window, suv_max, target_spacing)
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def load_cached(directory: str | os.PathLike) -> CachedStudy:
    """Rebuild a CachedStudy from `directory/meta.json` (as written by prepare_cache)."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        return CachedStudy(
            case_id=meta["case_id"], patient_id=meta["patient_id"], source=meta["source"],
            shape=tuple(meta["shape"]), spacing=tuple(meta["spacing"]), affine=meta["affine"],
            has_tumor=meta["has_tumor"], has_mask=meta["has_mask"],
            fg_slices=list(meta["fg_slices"]), directory=str(directory),
            has_organs=bool(meta.get("has_organs", False)),
            max_organ_label=int(meta.get("max_organ_label", 0)), suv_max=meta.get("suv_max"),
            content_hash=meta.get("content_hash"), ref=meta.get("ref"),
            original_shape=tuple(meta["original_shape"]) if meta.get("original_shape") else None,
            original_affine=meta.get("original_affine"), target_spacing=meta.get("target_spacing"))
    except FileNotFoundError:
        raise DataError(f"no cached study at {directory} (missing meta.json); run "
                        f"prepare_cache again or point to the right cache_dir") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"corrupt cache file {meta_path} ({err}); delete the folder "
                        f"{directory} and run again to rebuild it") from None


def prepare_cache(items: Iterable[StudyRef | Study], cache_dir: str | os.PathLike, *,
                  ct_window: tuple[float, float] = (-1000.0, 1000.0), suv_max: float = 20.0,
                  resample: bool = False, target_spacing: float | None = None,
                  progress: bool = True) -> list[CachedStudy]:
    """Preprocess each study (a StudyRef, loaded with data.io.load_study, or a Study) into
    `cache_dir/<key>/<case_id>-<source>/` unless an up-to-date copy is there; return them in
    order.

    `items` may be a lazy iterator: only one study is held in memory at a time.
    resample: passed to load_study for refs (CT / mask onto the PET grid when grids differ);
    it is part of each ref's fingerprint, so toggling it gives those studies new folders.
    target_spacing: in-plane spacing in mm to resample every study to (module docstring), or
    None for each study's own grid; part of the cache key.
    Every study is tried: the studies that cannot be read or preprocessed are reported together
    in one DataError at the end (the good ones stay cached), not one at a time.
    """
    lo, hi = (float(v) for v in ct_window)
    if not lo < hi:
        raise DataError(f"ct_window={tuple(ct_window)}: give (low, high) in HU with low < high")
    if not suv_max > 0:
        raise DataError(f"suv_max={suv_max} must be > 0 (SUV is clipped to [0, suv_max])")
    if target_spacing is not None and not target_spacing > 0:
        raise DataError(f"target_spacing={target_spacing} must be > 0 (mm) or None (native grid)")
    root = Path(cache_dir) / cache_key((lo, hi), suv_max, target_spacing)
    root.mkdir(parents=True, exist_ok=True)
    params = cache_params((lo, hi), suv_max, target_spacing)
    (root / "params.json").write_text(json.dumps(params, indent=1))  # for humans only

    total = len(items) if hasattr(items, "__len__") else None
    cached, seen, bad, n_items = [], {}, [], 0
    for item in tqdm(items, total=total, desc="preprocess", unit="study", disable=not progress):
        n_items += 1
        if item.case_id in seen:
            bad.append((item.case_id, f"two studies share case_id {item.case_id!r} "
                                      f"({seen[item.case_id]} and {_source(item)}); case ids "
                                      f"must be unique, rename one of the folders"))
            continue
        seen[item.case_id] = _source(item)
        try:
            cached.append(_cache_one(item, root, (lo, hi), float(suv_max), resample, target_spacing))
        except DataError as err:
            bad.append((item.case_id, str(err)))
    if bad:
        lines = "\n".join(f"  {case}: {message}" for case, message in bad[:30])
        more = f"\n  ... and {len(bad) - 30} more" if len(bad) > 30 else ""
        raise DataError(f"{len(bad)} of {n_items} studies could not be prepared (the others "
                        f"are cached):\n{lines}{more}\nfix or remove them and run again")
    return cached


def _source(item: StudyRef | Study) -> str:
    return item.source if isinstance(item, Study) else str(item.paths)


def _cache_one(item: StudyRef | Study, root: Path, ct_window: tuple[float, float],
               suv_max: float, resample: bool, target_spacing: float | None = None) -> CachedStudy:
    case_id = item.case_id
    if not case_id or case_id.startswith(".") or "/" in case_id or os.sep in case_id:
        raise DataError(f"case_id {case_id!r} of {_source(item)} is not a safe folder name; "
                        f"use data.study.safe_id to build it")
    fingerprint = _fingerprint(item, resample)
    final = root / f"{case_id}-{source_key(fingerprint)}"
    if _is_fresh(final, fingerprint):
        return load_cached(final)

    if isinstance(item, StudyRef):
        from data.io import load_study  # the readers; imported here so tests need only study.py
        study = load_study(item, resample=resample)
    else:
        study = item
    _check_study(study)
    study, original = resample_inplane(study, target_spacing)
    tmp = root / f".tmp-{case_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _write_study(study, tmp, ct_window, suv_max)
        meta.update(original or {})
        meta["fingerprint"] = fingerprint
        if isinstance(item, StudyRef):
            meta["ref"] = {"case_id": item.case_id, "patient_id": item.patient_id,
                           "layout": item.layout, "paths": dict(item.paths),
                           "series_uids": dict(item.series_uids)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something failed
    log.debug("cached %s -> %s", case_id, final)
    return load_cached(final)


def source_key(fingerprint: dict) -> str:
    """Short hash of a source fingerprint: the `<source>` part of a study's cache folder."""
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]


def _fingerprint(item: StudyRef | Study, resample: bool) -> dict:
    """What identifies the source: size + mtime of every file for a ref, a content hash for
    an in-memory Study (it has no files). Folders (DICOM, PNG) are walked file by file."""
    if isinstance(item, Study):
        digest = hashlib.blake2b(digest_size=16)
        for name in ("ct", "pet", "mask", "organs"):
            arr = getattr(item, name)
            if arr is None:
                digest.update(b"none")
                continue
            if arr.flags.f_contiguous and not arr.flags.c_contiguous:
                arr = arr.T  # nibabel's Fortran-order arrays: hash without a copy
            arr = np.ascontiguousarray(arr)
            digest.update(f"{name}{arr.dtype}{arr.shape}".encode())
            digest.update(arr.view(np.uint8).reshape(-1))
        digest.update(np.asarray(item.affine, np.float64).tobytes())
        return {"kind": "array", "hash": digest.hexdigest()}
    files = []
    for role, path in sorted(item.paths.items()):
        path = Path(path)
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in found:
            try:
                st = p.stat()
            except FileNotFoundError:
                raise DataError(f"{p} ({role} of study {item.case_id}) does not exist; "
                                f"re-run find_studies on the data folder") from None
            files.append([role, str(p.absolute()), st.st_size, st.st_mtime_ns])
    return {"kind": "files", "files": files, "layout": item.layout, "resample": bool(resample),
            "series_uids": dict(item.series_uids)}


def _is_fresh(directory: Path, fingerprint: dict) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    needed = ["image.npy", "mask.npy"] + (["organs.npy"] if meta.get("has_organs") else [])
    return all((directory / name).is_file() for name in needed) and \
        meta.get("format") == FORMAT_VERSION and meta.get("fingerprint") == fingerprint and \
        bool(meta.get("content_hash"))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished study into place. A stale copy is moved aside first (a folder cannot
    be renamed onto a non-empty one), so `final` is always either absent or complete."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, old)
        except FileNotFoundError:  # another process moved it first
            old = None
    try:
        os.rename(tmp, final)
    except OSError:
        # another process (e.g. a second DDP rank) finished the same study first: keep theirs
        if not final.exists():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resample_inplane(study: Study, target_spacing: float | None) -> tuple[Study, dict | None]:
    """The study on the in-plane grid of spacing `target_spacing` (`data.geometry.inplane_grid`):
    CT and PET linear, mask and organ labels nearest, z untouched. Returns (study, the original
    grid as meta.json keys), or (study, None) when target_spacing is None or already the study's
    in-plane spacing (within 1e-6 mm)."""
    if target_spacing is None:
        return study, None
    from data.geometry import inplane_grid, resample_to_grid, spacing_from_affine

    affine = np.asarray(study.affine, np.float64)
    spacing = spacing_from_affine(affine)
    if all(abs(spacing[a] - target_spacing) < 1e-6 for a in (0, 1)):
        return study, None
    shape, new_affine = inplane_grid(study.pet.shape, affine, target_spacing)

    def on_grid(array: np.ndarray | None, order: int, cval: float, dtype) -> np.ndarray | None:
        if array is None:
            return None
        out = resample_to_grid(array, affine, new_affine, shape, order=order, cval=cval)
        return out.astype(dtype) if order else np.rint(out).astype(dtype)

    resampled = Study(
        ct=on_grid(study.ct, 1, -1000.0, np.float32), pet=on_grid(study.pet, 1, 0.0, np.float32),
        mask=on_grid(study.mask, 0, 0.0, np.uint8), spacing=spacing_from_affine(new_affine),
        affine=new_affine, case_id=study.case_id, patient_id=study.patient_id,
        source=study.source, organs=on_grid(study.organs, 0, 0.0, np.uint8))
    original = {"original_shape": [int(n) for n in study.pet.shape],
                "original_affine": affine.tolist(), "target_spacing": float(target_spacing)}
    return resampled, original


def _check_study(study: Study) -> None:
    if study.ct.ndim != 3 or study.ct.shape != study.pet.shape:
        raise DataError(f"study {study.case_id} ({study.source}): CT {study.ct.shape} and PET "
                        f"{study.pet.shape} must be 3-D arrays on one grid; resample CT to "
                        f"the PET grid (resample=True)")
    if study.mask is not None and study.mask.shape != study.pet.shape:
        raise DataError(f"study {study.case_id} ({study.source}): mask {study.mask.shape} and "
                        f"PET {study.pet.shape} differ; resample the mask to the PET grid")
    if study.organs is not None:
        organs = np.asarray(study.organs)
        if organs.shape != study.pet.shape:
            raise DataError(f"study {study.case_id} ({study.source}): organ labels {organs.shape} "
                            f"and PET {study.pet.shape} differ; resample the labels to the PET "
                            f"grid (nearest neighbour)")
        integer = np.issubdtype(organs.dtype, np.integer) or organs.dtype == np.bool_
        if not integer or (organs.size and (organs.min() < 0 or organs.max() > 255)):
            raise DataError(f"study {study.case_id} ({study.source}): organ labels must be "
                            f"integers in 0..255, got {organs.dtype} values; read the study with "
                            f"data.load_study or convert with data.geometry.check_labels")


def _write_study(study: Study, out: Path, ct_window: tuple[float, float],
                 suv_max: float) -> dict:
    """Write image.npy / mask.npy into `out` block by block; return the metadata dict."""
    _check_study(study)
    nx, ny, nz = study.pet.shape
    lo, hi = ct_window
    fg = np.zeros(nz, bool)
    digest = hashlib.blake2b(digest_size=16)  # of every byte written and the geometry
    digest.update(json.dumps([list(study.pet.shape), [float(s) for s in study.spacing],
                              np.asarray(study.affine, np.float64).round(6).tolist()]).encode())
    with open(out / "image.npy", "wb") as f_img, open(out / "mask.npy", "wb") as f_mask:
        _npy_header(f_img, (nz, 2, nx, ny), np.float16)
        _npy_header(f_mask, (nz, nx, ny), np.uint8)
        for z0 in range(0, nz, _BLOCK):
            z1 = min(z0 + _BLOCK, nz)
            ct = np.moveaxis(study.ct[:, :, z0:z1], 2, 0).astype(np.float32)  # (k, X, Y)
            pet = np.moveaxis(study.pet[:, :, z0:z1], 2, 0).astype(np.float32)  # (k, X, Y)
            if not (np.isfinite(ct).all() and np.isfinite(pet).all()):
                raise DataError(f"study {study.case_id} ({study.source}) has NaN/inf voxels in "
                                f"slices {z0}-{z1 - 1}; fix or exclude the study")
            block = np.empty((z1 - z0, 2, nx, ny), np.float16)  # (k, 2, X, Y)
            block[:, 0] = (np.clip(ct, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
            block[:, 1] = np.clip(pet, 0.0, suv_max) * (2.0 / suv_max) - 1.0
            f_img.write(block.tobytes())
            digest.update(block.tobytes())
            if study.mask is None:
                mask = np.zeros((z1 - z0, nx, ny), np.uint8)
            else:
                mask = np.ascontiguousarray(np.moveaxis(study.mask[:, :, z0:z1], 2, 0))
                if mask.size and (mask.min() < 0 or mask.max() > 1):
                    raise DataError(f"mask of study {study.case_id} ({study.source}) has values "
                                    f"outside {{0, 1}} (max {mask.max()}); give a binary mask")
                mask = mask.astype(np.uint8)
            fg[z0:z1] = mask.any(axis=(1, 2))
            f_mask.write(mask.tobytes())
            digest.update(mask.tobytes())
    fg_slices = np.flatnonzero(fg).tolist()
    max_organ_label = 0
    if study.organs is not None:  # organs.npy, uint8 (Z, X, Y), block by block like the mask
        with open(out / "organs.npy", "wb") as f_organs:
            _npy_header(f_organs, (nz, nx, ny), np.uint8)
            for z0 in range(0, nz, _BLOCK):
                organs = np.moveaxis(study.organs[:, :, z0:z0 + _BLOCK], 2, 0).astype(np.uint8)
                max_organ_label = max(max_organ_label, int(organs.max(initial=0)))
                f_organs.write(organs.tobytes())
                digest.update(organs.tobytes())
    return {
        "format": FORMAT_VERSION, "case_id": study.case_id, "patient_id": study.patient_id,
        "source": str(study.source), "shape": [nx, ny, nz],
        "spacing": [float(s) for s in study.spacing],
        "affine": np.asarray(study.affine, np.float64).tolist(),
        "has_tumor": bool(fg_slices), "has_mask": study.mask is not None,
        "fg_slices": fg_slices, "ct_window": [lo, hi], "suv_max": suv_max,
        "has_organs": study.organs is not None, "max_organ_label": max_organ_label,
        "content_hash": digest.hexdigest(),
    }


def _npy_header(f, shape: tuple[int, ...], dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
