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

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .cache import CachedStudy, load_cached, prepare_cache
from .io import find_studies
from .split import split_cases
from .study import DataError


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
                  suv_max: float, resample: bool = False, target_spacing: float | None = None,
                  require_mask: bool = True, progress: bool = True) -> list[CachedStudy]:
    """Every study under `data_dir`, preprocessed once into `<cache_dir>/studies/`
    (`target_spacing`: in-plane resampling in the cache, data/cache.py)."""
    # absolute paths: the run's records and the cache's sources stay valid from any folder
    refs = find_studies(Path(data_dir).absolute(), layout=layout, ct_channel=ct_channel,
                        pet_channel=pet_channel, require_mask=require_mask)
    return prepare_cache(refs, Path(cache_dir).absolute() / "studies", ct_window=ct_window,
                         suv_max=suv_max, resample=resample, target_spacing=target_spacing,
                         progress=progress)


def prepare_data(*, data_dir: str | os.PathLike | None, cache_dir: str | os.PathLike,
                 layout: str = "auto", ct_channel: int = 0, pet_channel: int = 1,
                 resample: bool = False, ct_window: tuple[float, float] = (-1000.0, 1000.0),
                 suv_max: float = 20.0, target_spacing: float | None = None,
                 phantom_cases: int = 60, phantom_size: str = "demo",
                 phantom_seed: int = 0, phantom_test_seed: int | None = None, n_val: int = 10,
                 n_test: int = 20, split_seed: int = 0, n_folds: int = 0,
                 fold: int = 0) -> Manifest:
    """Find or generate the studies, preprocess them into the cache, split them by patient.

    With the phantom and `phantom_test_seed` set, the test studies are a phantom of their own
    (n_test studies of that seed, which the model never sees in any form) and the
    `phantom_cases` studies of `phantom_seed` are split into training and validation only. So
    the test set stays the same when phantom_cases changes (a nested comparison: the same 50
    test studies for 40 or 200 training studies)."""
    def cache(folder) -> list[CachedStudy]:
        return cache_studies(folder, cache_dir=cache_dir, layout=layout, ct_channel=ct_channel,
                             pet_channel=pet_channel, ct_window=ct_window, suv_max=suv_max,
                             resample=resample, target_spacing=target_spacing)

    separate_test = data_dir is None and phantom_test_seed is not None
    if data_dir is None:
        data_dir = generate_phantom(cache_dir, size=phantom_size, seed=phantom_seed,
                                    n_cases=phantom_cases)
    studies = cache(data_dir)
    split = split_cases(studies, n_val=n_val, n_test=0 if separate_test else n_test,
                        seed=split_seed, n_folds=0 if separate_test else n_folds, fold=fold)
    if separate_test:
        test_dir = generate_phantom(cache_dir, size=phantom_size, seed=phantom_test_seed,
                                    n_cases=n_test)
        test_studies = cache(test_dir)
        clash = {s.case_id for s in studies} & {s.case_id for s in test_studies}
        if clash:
            raise DataError(f"the test phantom (seed {phantom_test_seed}) and the training phantom "
                            f"(seed {phantom_seed}) share case ids {sorted(clash)[:3]}: choose "
                            "another --phantom_test_seed")
        studies = studies + test_studies
        split["test"] = sorted(s.case_id for s in test_studies)
    return Manifest(str(Path(data_dir).absolute()), studies, split)


# ---- the record a run keeps of its data (run_dir/cases.json) --------------------------------

MANIFEST_FORMAT = 2


def save_manifest(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write what the run used: the data folder and, per study, its cache folder, source and the
    hash of its cached bytes (atomically: temporary file + rename)."""
    path = Path(path)
    doc = {"format": MANIFEST_FORMAT, "data_dir": manifest.data_dir,
           "studies": [{"case_id": s.case_id, "patient_id": s.patient_id, "source": s.source,
                        "directory": s.directory, "content_hash": s.content_hash,
                        "has_tumor": s.has_tumor} for s in manifest.studies]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def load_manifest(path: str | os.PathLike) -> dict:
    """cases.json of a run -> {"data_dir", "studies": [record, ...]}. Runs written before content
    hashes were recorded kept a plain list of cache folders: those come back with
    content_hash None (nothing to verify against)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found; it is written by main.py. Pass --data_dir=<labelled "
                        "studies> to evaluate on a folder") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); restore it from a copy") from None
    if isinstance(doc, list):  # the first format: cache folders only
        studies = []
        for directory in doc:
            cached = load_cached(directory)
            studies.append({"case_id": cached.case_id, "patient_id": cached.patient_id,
                            "source": cached.source, "directory": directory,
                            "content_hash": None, "has_tumor": cached.has_tumor})
        return {"format": 1, "data_dir": None, "studies": studies}
    return doc


def check_same_data(recorded: dict, current: list[CachedStudy], case_ids: list[str],
                    what: str) -> list[CachedStudy]:
    """The current cached studies of `case_ids`, refusing any that differs from what the run
    recorded (a missing study, another source, other cached bytes). Raises one DataError that
    lists every difference; records without a hash (old runs) are taken as they are."""
    by_id = {s.case_id: s for s in current}
    recorded_by_id = {r["case_id"]: r for r in recorded["studies"]}
    out, problems = [], []
    for case in case_ids:
        record, now = recorded_by_id.get(case), by_id.get(case)
        if now is None:
            problems.append(f"{case}: no longer in the data ({record and record['source']})")
        elif record is None:
            problems.append(f"{case}: not in the run's cases.json")
        elif record["content_hash"] and record["content_hash"] != now.content_hash:
            problems.append(f"{case}: its data changed since the run (source {now.source}; "
                            f"cached bytes {now.content_hash} instead of {record['content_hash']})")
        else:
            out.append(now)
    if problems:
        lines = "\n  ".join(problems[:20])
        raise DataError(f"the {what} studies differ from those the run recorded in cases.json:\n  "
                        f"{lines}\nevaluate what is there now with --data_dir=<folder>, or "
                        "restore the data the run used")
    return out
