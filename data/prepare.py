"""Data preparation in one call: find (or generate) the studies, preprocess them into the cache,
split them by patient. main.py and test.py both come through here.

    manifest = prepare_data(data_dir=None, cache_dir="cache", phantom_cases=60, n_val=10, n_test=20)
    manifest.studies          # list[CachedStudy], sorted by case_id
    manifest.split            # {"train": [...], "val": [...], "test": [...]} case ids

With `data_dir=None` the built-in phantom is generated once into `<cache_dir>/phantom/...` and
reused; any other folder is read with the layout readers of `data/io.py` (nothing is ever
written under it). Every setting is an explicit keyword argument (the package never sees a
Config).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cache import CachedStudy, prepare_cache
from .io import find_studies
from .split import split_cases


@dataclass(frozen=True)
class Manifest:
    """What a run trains and is evaluated on: the folder read, its cached studies, the split."""

    data_dir: str
    studies: list[CachedStudy]
    split: dict[str, list[str]]

    def by_id(self) -> dict[str, CachedStudy]:
        return {s.case_id: s for s in self.studies}

    def subset(self, name: str) -> list[CachedStudy]:
        """The cached studies of split set `name` ("train", "val" or "test"), in split order."""
        by_id = self.by_id()
        return [by_id[c] for c in self.split[name]]


def phantom_dir(cache_dir: str | os.PathLike, size: str, seed: int, n_cases: int) -> Path:
    """Where the built-in phantom of (size, seed, n_cases) lives inside the cache folder."""
    return Path(cache_dir) / "phantom" / f"{size}-seed{seed}-n{n_cases}"


def generate_phantom(cache_dir: str | os.PathLike, *, size: str, seed: int, n_cases: int,
                     workers: int | None = None) -> Path:
    """Generate (or complete) the phantom in the cache; returns its folder."""
    from .phantom import generate  # scipy-heavy; only when the phantom is used

    folder = phantom_dir(cache_dir, size, seed, n_cases)
    generate(folder, n_cases, size=size, seed=seed, workers=workers or min(8, os.cpu_count() or 1))
    return folder


def cache_studies(data_dir: str | os.PathLike, *, cache_dir: str | os.PathLike, layout: str = "auto",
                  ct_channel: int = 0, pet_channel: int = 1, ct_window: tuple[float, float],
                  suv_max: float, resample: bool = False, require_mask: bool = True,
                  progress: bool = True) -> list[CachedStudy]:
    """Every study under `data_dir`, preprocessed once into `<cache_dir>/studies/`."""
    # absolute paths: the run's records and the cache's sources stay valid from any folder
    refs = find_studies(Path(data_dir).absolute(), layout=layout, ct_channel=ct_channel,
                        pet_channel=pet_channel, require_mask=require_mask)
    return prepare_cache(refs, Path(cache_dir).absolute() / "studies", ct_window=ct_window,
                         suv_max=suv_max, resample=resample, progress=progress)


def prepare_data(*, data_dir: str | os.PathLike | None, cache_dir: str | os.PathLike,
                 layout: str = "auto", ct_channel: int = 0, pet_channel: int = 1,
                 resample: bool = False, ct_window: tuple[float, float] = (-1000.0, 1000.0),
                 suv_max: float = 20.0, phantom_cases: int = 60, phantom_size: str = "demo",
                 phantom_seed: int = 0, n_val: int = 10, n_test: int = 20, split_seed: int = 0,
                 n_folds: int = 0, fold: int = 0) -> Manifest:
    """Find or generate the studies, preprocess them into the cache, split them by patient."""
    if data_dir is None:
        data_dir = generate_phantom(cache_dir, size=phantom_size, seed=phantom_seed,
                                    n_cases=phantom_cases)
    studies = cache_studies(data_dir, cache_dir=cache_dir, layout=layout, ct_channel=ct_channel,
                            pet_channel=pet_channel, ct_window=ct_window, suv_max=suv_max,
                            resample=resample)
    split = split_cases(studies, n_val=n_val, n_test=n_test, seed=split_seed, n_folds=n_folds,
                        fold=fold)
    return Manifest(str(Path(data_dir).absolute()), studies, split)
