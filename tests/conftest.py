"""Shared fixtures: tiny synthetic PET/CT studies written by the tests themselves.

`tiny_autopet_dir`: the autoPET per-study layout with 6 studies of 5 patients (PETCT_p03 has two
studies), each 32 x 32 x 12 voxels of 2 x 2 x 3 mm, float32 CT (HU) / SUV and a uint8 SEG.
Studies 0, 2, 4 (in case_id order) hold one small tumour, 1, 3, 5 are tumour-free; every study
has a bright, non-tumour "bladder" so that SUV alone does not give the label. Session-scoped and
read-only: copy it (shutil.copytree) before changing anything in it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

TINY_SHAPE = (32, 32, 12)
TINY_SPACING = (2.0, 2.0, 3.0)
TINY_AFFINE = np.array([[-2.0, 0, 0, 30.0], [0, -2.0, 0, 40.0], [0, 0, 3.0, -500.0], [0, 0, 0, 1]])
TINY_STUDIES = [  # (patient folder, study folder, has tumour), case_ids sorted as listed
    ("PETCT_p01", "01-02-2003-NA-PET-CT Ganzkoerper  primaer mit KM-10001", True),
    ("PETCT_p02", "03-04-2005-NA-PET-CT Ganzkoerper  primaer mit KM-10002", False),
    ("PETCT_p03", "05-06-2007-NA-PET-CT Ganzkoerper  primaer mit KM-10003", True),
    ("PETCT_p03", "07-08-2008-NA-PET-CT Ganzkoerper  primaer mit KM-10004", False),
    ("PETCT_p04", "09-10-2009-NA-PET-CT Ganzkoerper  primaer mit KM-10005", True),
    ("PETCT_p05", "11-12-2010-NA-PET-CT Ganzkoerper  primaer mit KM-10006", False),
]


def make_tiny_study(seed: int, has_tumor: bool, shape=TINY_SHAPE):
    """(ct HU, pet SUV, mask uint8), each (X, Y, Z): a body ellipse, a hot bladder, maybe a tumour."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 <= 1
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    pet = np.where(body, 1.0, 0.05) + rng.normal(0, 0.05, shape)
    bladder = (x - cx) ** 2 + (y - cy + 4) ** 2 + (z - 2) ** 2 <= 4
    pet[bladder] = 6.0
    mask = np.zeros(shape, np.uint8)
    if has_tumor:
        c = rng.integers([cx - 6, cy, 5], [cx + 6, cy + 5, shape[2] - 3])
        tumour = (x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * 1.5) ** 2 <= 4
        mask[tumour] = 1
        pet[tumour] = 5.0 + rng.uniform(0, 3)
    return ct.astype(np.float32), np.clip(pet, 0, None).astype(np.float32), mask


def write_autopet_study(study_dir: Path, ct, pet, mask=None, affine=TINY_AFFINE) -> Path:
    """Write CTres.nii.gz, SUV.nii.gz (and SEG.nii.gz) into `study_dir` (created)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(ct, np.float32), affine), study_dir / "CTres.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(pet, np.float32), affine), study_dir / "SUV.nii.gz")
    if mask is not None:
        nib.save(nib.Nifti1Image(np.asarray(mask, np.uint8), affine), study_dir / "SEG.nii.gz")
    return study_dir


@pytest.fixture(scope="session")
def tiny_autopet_dir(tmp_path_factory) -> Path:
    """Root of the tiny autoPET-layout data set described in the module docstring (read-only)."""
    root = tmp_path_factory.mktemp("tiny_autopet")
    for i, (patient, study, has_tumor) in enumerate(TINY_STUDIES):
        ct, pet, mask = make_tiny_study(seed=i, has_tumor=has_tumor)
        write_autopet_study(root / patient / study, ct, pet, mask)
    return root


@pytest.fixture()
def one_thread():
    """Tiny tensors: one torch thread is fastest on a shared, busy 2-core machine (no
    oversubscription). Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PetThreshold(torch.nn.Module):
    """logit = 20 * (PET channel + 0.7): 'SUV > 3' at suv_max 20, a deterministic per-pixel toy
    model (a 1x1 convolution, so its weights load from a checkpoint like a real model's)."""

    def __init__(self, in_channels: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 1, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 1] = 20.0
            self.conv.bias.fill_(14.0)

    def forward(self, x):
        return self.conv(x)


def write_toy_run(run_dir: Path, cfg, manifest, model: torch.nn.Module, **checkpoint) -> dict:
    """A run directory as main.py leaves it, without training: config.json, split.json (the
    first study "trained" on, the second validation, the rest test), cases.json and
    checkpoints/best.pt holding `model`'s weights (plus any `checkpoint` entries). The split."""
    import config
    from data.prepare import Manifest, save_manifest
    from data.split import save_split

    ids = sorted(s.case_id for s in manifest.studies)
    split = {"train": ids[:1], "val": ids[1:2], "test": ids[2:]}
    (run_dir / "checkpoints").mkdir(parents=True)
    config.save_config(cfg, run_dir / "config.json")
    save_split(split, run_dir / "split.json")
    save_manifest(Manifest(manifest.data_dir, manifest.studies, split), run_dir / "cases.json")
    torch.save({"model": model.state_dict(), **checkpoint}, run_dir / "checkpoints" / "best.pt")
    return split


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tiny_run(tmp_path: Path, name: str, *extra: str) -> Path:
    """`main.py --preset=tiny` into tmp_path/runs/<name>, every epoch's weights kept, no
    overlays; returns the run folder."""
    import main

    main.main(["--preset=tiny", f"--out_dir={tmp_path / 'runs'}", f"--run_name={name}",
               f"--cache_dir={tmp_path / 'cache'}", "--keep_epoch_checkpoints=True",
               "--save_overlays=False", *extra])
    return tmp_path / "runs" / name
