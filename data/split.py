"""Patient-level, tumour-stratified, deterministic train / val / test split (and k-fold).

    split = split_cases(cached, n_val=10, n_test=20, seed=0)   # {"train": [...], "val": [...], "test": [...]}
    save_split(split, run_dir / "split.json")

All studies of a patient land in one set (autoPET has patients with two studies: splitting
them would leak the patient's anatomy into the test set). A patient counts as "tumour" if any
of its studies has tumour. The patients of each stratum are sorted by id and shuffled with
`np.random.default_rng(seed)`, then the two strata are interleaved in proportion (patient r of
a stratum of size n gets the key (r + 0.5) / n), so that every prefix of the order, and every
fold taken round-robin from it, holds both strata in the cohort's proportion (within one
patient). The result depends on the seed and the set of cases, never on their input order.

Sizes: `n_val` and `n_test` count studies; whole patients are taken in order until at least
that many studies are in the set (exact when every patient has one study). With n_folds > 1
the test set is fold `fold` of the patients (n_test is ignored) and `n_val` studies of the
remaining patients form the validation set.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from data.study import DataError

SETS = ("train", "val", "test")


def _patients(cases: Iterable[Any]) -> tuple[dict[str, list[str]], dict[str, bool]]:
    """patient_id -> sorted case ids, and patient_id -> has tumour (any of its studies)."""
    studies: dict[str, list[str]] = {}
    tumour: dict[str, bool] = {}
    seen = set()
    for case in cases:
        if case.case_id in seen:
            raise DataError(f"case_id {case.case_id!r} appears twice in the split input; "
                            f"case ids must be unique")
        seen.add(case.case_id)
        studies.setdefault(case.patient_id, []).append(case.case_id)
        tumour[case.patient_id] = tumour.get(case.patient_id, False) or bool(case.has_tumor)
    return {p: sorted(c) for p, c in studies.items()}, tumour


def _stratified_order(tumour: dict[str, bool], seed: int) -> list[str]:
    """Patients in a seeded order whose every prefix is stratified by tumour / no tumour."""
    rng = np.random.default_rng(seed)
    keyed = []
    for stratum in (True, False):
        members = sorted(p for p, t in tumour.items() if t == stratum)
        order = rng.permutation(len(members))
        for rank, idx in enumerate(order):
            keyed.append(((rank + 0.5) / len(members), not stratum, members[idx]))
    return [p for _, _, p in sorted(keyed)]


def _take(order: list[str], studies: dict[str, list[str]], n_studies: int) -> list[str]:
    """The first patients of `order` until they hold at least `n_studies` studies."""
    taken, count = [], 0
    for p in order:
        if count >= n_studies:
            break
        taken.append(p)
        count += len(studies[p])
    return taken


def split_cases(cases: Iterable[Any], *, n_val: int, n_test: int, seed: int = 0,
                n_folds: int = 0, fold: int = 0) -> dict[str, list[str]]:
    """Split studies (objects with case_id, patient_id, has_tumor) into train / val / test.

    Returns {"train": [...], "val": [...], "test": [...]} of sorted case ids.
    """
    studies, tumour = _patients(cases)
    n_patients = len(studies)
    if n_val < 0 or n_test < 0:
        raise DataError(f"n_val={n_val} and n_test={n_test} must be >= 0")
    if n_patients == 0:
        raise DataError("no studies to split; check data_dir")
    order = _stratified_order(tumour, seed)

    if n_folds > 1:
        if n_folds > n_patients:
            raise DataError(f"n_folds={n_folds} is more than the {n_patients} patients; "
                            f"use n_folds <= {n_patients}")
        if not 0 <= fold < n_folds:
            raise DataError(f"fold={fold} must be in 0..{n_folds - 1} (n_folds={n_folds})")
        test = order[fold::n_folds]  # round-robin over the stratified order: stratified folds
        rest = [p for i, p in enumerate(order) if i % n_folds != fold]
    elif n_folds == 0:
        test = _take(order, studies, n_test)
        rest = order[len(test):]
    else:
        raise DataError(f"n_folds={n_folds}: use 0 (no cross-validation) or >= 2")
    val = _take(rest, studies, n_val)
    train = rest[len(val):]
    if not train:
        raise DataError(f"n_val={n_val} and n_test={n_test} (n_folds={n_folds}) leave no "
                        f"training patient out of {n_patients} patients "
                        f"({sum(len(c) for c in studies.values())} studies); lower them")

    def cases_of(patients: list[str]) -> list[str]:
        return sorted(c for p in patients for c in studies[p])

    return {"train": cases_of(train), "val": cases_of(val), "test": cases_of(test)}


def save_split(split: dict[str, list[str]], path: str | os.PathLike) -> None:
    """Write the split as JSON (atomically: temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: list(split[k]) for k in SETS}, indent=1))
    os.replace(tmp, path)


def load_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a split written by save_split."""
    try:
        split = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"split file {path} not found; was the run directory moved?") from None
    except json.JSONDecodeError as err:
        raise DataError(f"split file {path} is not valid JSON ({err}); delete it to "
                        f"recompute the split") from None
    if not isinstance(split, dict) or any(not isinstance(split.get(k), list) for k in SETS):
        raise DataError(f"split file {path} must hold lists 'train', 'val' and 'test'")
    return {k: [str(c) for c in split[k]] for k in SETS}
