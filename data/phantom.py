"""Synthetic whole-body PET/CT phantom: hard the way real PET/CT is hard (docs/phantom.md).

Tumours are tiny (~1e-5 of the voxels), half the studies are tumour-free, and the brightest
things in the PET are not tumours (brain, bladder, renal pelvis, heart, ureter boluses,
brown fat). Lesions have CT signatures (nodes in fat, lung nodules, hypo-attenuating liver
metastases, lytic / sclerotic bone), so a model that uses CT context can beat SUV
thresholding. Every study is a pure function of (seed, index).

    python -m data.phantom --out_dir=phantom --n_cases=40 --size=demo --seed=0
    python -m data.phantom --out_dir=phantom_ap --n_cases=10 --size=autopet --layout=both --workers=2

Layouts written (docs/data.md, "Layouts"):
    autopet: <out_dir>/PETCT_<10 hex>/<MM-DD-YYYY-NA-PET-CT Ganzkoerper  primaer mit KM-xxxxx>/
             {SUV,CTres,SEG,ORGANS}.nii.gz   (float32 SUV, float32 HU, uint8 tumour label,
             uint8 organ labels of data/organs.py ORGAN_LABELS; one affine)
    nnunet:  <out_dir>/imagesTr/<case>_0000.nii.gz (CT), _0001 (PET), labelsTr/<case>.nii.gz,
             organsTr/<case>.nii.gz
and <out_dir>/phantom_metadata.json (per-case and per-lesion metadata, PHANTOM_VERSION).
A folder written by an older PHANTOM_VERSION (or lacking a study's ORGANS file) is completed
by rewriting those studies; CT, PET and SEG of a study are the same in every version.
Every 10th study (index % 10 == 9) is a second study of the previous study's patient.

Image formation (per study): SUV activity map painted with partial-volume edges -> 3-D
Gaussian blur, FWHM U(4.5, 6.5) mm -> Poisson counts, Poisson(A * c) / c, with c set so the
liver CoV after post-filtering is U(8, 12) % -> 2 mm FWHM post-filter -> global scale
U(0.85, 1.15) -> clip >= 0. CT: tissue HU -> light blur -> Gaussian noise sigma U(12, 20) HU
(x1.6 in the pelvis) -> air outside the body set to -1000 or -1024.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import ndimage

from data import _anatomy as A
from data.organs import organ_labels
from data.study import DataError

log = logging.getLogger(__name__)

# Presets (docs/phantom.md, "Sizes"). xy: in-plane scale of the anatomy (the unit grid is 32 cm
# wide); kz: axial compression (world mm per anatomical mm) so that the anatomical range
# za (mm below the vertex) fits `slices`; the FOV is anchored at its feet end.
SIZES: dict[str, dict] = {
    "unit": dict(spacing=(5.0, 5.0, 5.0), matrix=64, slices=(32, 32), xy=0.55,
                 kz=(0.2, 0.2), za=(80.0, 880.0)),
    "demo": dict(spacing=(4.0, 4.0, 4.0), matrix=128, slices=(104, 128), xy=1.0,
                 kz=(0.52, 0.61), za=(40.0, 880.0)),
    "autopet": dict(spacing=(2.0364, 2.0364, 3.0), matrix=256, slices=(200, 326), xy=1.0,
                    kz=(0.92, 1.08), za=(40.0, 1000.0)),
}
FWHM_2_SIGMA = 1 / (2 * np.sqrt(2 * np.log(2)))  # sigma = FWHM / 2.3548
METADATA = "phantom_metadata.json"
# 1: CT, PET, SEG; 2: + the organ label volume (ORGANS.nii.gz / organsTr). Bump when the files
# written for a study change; studies of another version are rewritten by `generate`.
PHANTOM_VERSION = 2
# fork: workers need not re-import (data/__init__ may pull in torch); spawn elsewhere
_START = "fork" if sys.platform.startswith("linux") else "spawn"


@dataclass
class Rendered:
    """One rendered study. Arrays (X, Y, Z), Z axial from feet to head."""

    ct: np.ndarray        # float32 HU
    pet: np.ndarray       # float32 SUV
    seg: np.ndarray       # uint8 {0, 1} tumour label
    tissue: np.ndarray    # uint8 tissue ids of data._anatomy (for benchmarks / oracles)
    spacing: tuple[float, float, float]
    affine: np.ndarray    # (4, 4) voxel -> world mm, RAS+
    meta: dict

    @property
    def organs(self) -> np.ndarray:
        """uint8 (X, Y, Z) organ labels (data/organs.py ORGAN_LABELS; lesions are 0)."""
        return organ_labels(self.tissue)


def patient_index(index: int) -> int:
    """Patient number of study `index`: study 10k+9 is a second study of study 10k+8's patient."""
    return index - (index + 1) // 10


def is_second_study(index: int) -> bool:
    return index % 10 == 9


def has_tumor(index: int, seed: int = 0) -> bool:
    """Exactly one study of each pair (2k, 2k+1) has tumours; which one is drawn from (seed, k)."""
    first = np.random.default_rng([seed, 3, index // 2]).random() < 0.5
    return (index % 2 == 0) == first


def names(index: int, seed: int = 0) -> dict:
    """Case id, patient folder and study folder (autoPET style, with spaces) of a study."""
    p = patient_index(index)
    pid = "PETCT_" + hashlib.sha1(f"phantom-{seed}-patient-{p}".encode()).hexdigest()[:10]
    study_hex = hashlib.sha1(f"phantom-{seed}-study-{index}".encode()).hexdigest()[:5]
    rd = np.random.default_rng([seed, 4, p])
    year, day = int(rd.integers(2002, 2020)), int(rd.integers(1, 29))
    # months 1-6 for the first study, 7-12 for the second: folders sort in time order
    month = int(rd.integers(1, 7)) + (6 if is_second_study(index) else 0)
    folder = f"{month:02d}-{day:02d}-{year}-NA-PET-CT Ganzkoerper  primaer mit KM-{study_hex}"
    case_id = pid + ("_2" if is_second_study(index) else "")
    return {"case_id": case_id, "patient_id": pid, "study_folder": folder}


def _preset(size: str) -> dict:
    if size not in SIZES:
        raise DataError(f"unknown phantom size {size!r}; use one of {sorted(SIZES)} "
                        f"(--size=demo for the CPU demo)")
    return SIZES[size]


def _make_body(rp: np.random.Generator, cfg: dict) -> tuple[A.Body, tuple[int, int, int]]:
    za0, za1 = cfg["za"]
    sz = cfg["spacing"][2]
    kz = float(rp.uniform(*cfg["kz"]))
    nz = int(np.clip(round((za1 - za0) * kz / sz), *cfg["slices"]))
    patient = float(rp.uniform(0.85, 1.2))
    body = A.Body(kz=kz, za_bottom=za1, s_trunk=cfg["xy"] * patient,
                  s_head=cfg["xy"] * patient ** 0.3, s_organ=cfg["xy"] * patient ** 0.5,
                  fat=cfg["xy"] * float(rp.uniform(10, 30)))
    return body, (cfg["matrix"], cfg["matrix"], nz)


def render(index: int, size: str = "demo", seed: int = 0) -> Rendered:
    """Render study `index` of the phantom with `seed`; a pure function of (size, seed, index)."""
    cfg = _preset(size)
    rp = np.random.default_rng([seed, 1, patient_index(index)])  # patient: geometry
    rs = np.random.default_rng([seed, 2, index])                 # study: uptake, lesions, noise
    body, shape = _make_body(rp, cfg)
    cv = A.Canvas(shape, cfg["spacing"])
    contrast = bool(rs.random() < 0.7)
    geo: dict = {}
    info: dict = {}
    v = A.draw_body(cv, body, rs)
    A.draw_skeleton(cv, body, rp, rs, v, geo)
    A.draw_head_neck(cv, body, rs, v)
    A.draw_organs(cv, body, rp, rs, v, geo, contrast)
    A.draw_distractors(cv, body, rs, v, geo, info)
    lesions: list[dict] = []
    tumour = has_tumor(index, seed)
    if tumour:
        n = min(1 + int(rs.poisson(1.5)), 6)
        while not lesions:  # a positive study has >= 1 lesion even on tiny grids
            lesions = A.draw_lesions(cv, body, rs, v, geo, n)
    misreg = float(rs.uniform(2, 6) * rs.choice([-1, 1])) if rs.random() < 0.2 else 0.0
    pet, pet_info = _form_pet(cv, rs, body, v, misreg)
    ct, ct_info = _form_ct(cv, rs, body)
    for les in lesions:
        sl, mask = les.pop("_mask")
        les["recovered_suvmax"] = round(float(pet[sl][mask].max()), 3)
    voxel_ml = float(np.prod(cv.spacing)) / 1000
    meta = {**names(index, seed), "index": index, "seed": seed, "size": size,
            "phantom_version": PHANTOM_VERSION,
            "has_tumor": tumour, "shape": list(shape), "spacing": [float(s) for s in cv.spacing],
            "contrast_ct": contrast, "misregistration_mm": round(misreg, 2),
            **pet_info, **ct_info, "distractors": info,
            "tumour_voxels": int(cv.seg.sum()), "tumour_ml": round(int(cv.seg.sum()) * voxel_ml, 4),
            "lesions": lesions}
    return Rendered(ct, pet, cv.seg, cv.tissue, tuple(float(s) for s in cv.spacing),
                    cv.affine, meta)


def make_study(index: int, size: str = "demo", seed: int = 0):
    """In-memory study: (ct float32 HU, pet float32 SUV, seg uint8, spacing mm, meta dict),
    arrays (X, Y, Z) in nibabel order with Z axial from feet to head."""
    r = render(index, size, seed)
    return r.ct, r.pet, r.seg, r.spacing, r.meta


def _postfilter_variance(sigma_vox: np.ndarray) -> float:
    """Variance factor of white noise through the separable Gaussian: prod_d sum_k w_k^2."""
    out = 1.0
    for s in sigma_vox:
        delta = np.zeros(41)
        delta[20] = 1
        w = ndimage.gaussian_filter1d(delta, s, truncate=4.0)
        out *= float((w ** 2).sum())
    return out


def _form_pet(cv: A.Canvas, rs: np.random.Generator, body: A.Body, v: dict, misreg: float):
    act = cv.suv
    if misreg:  # breathing: activity near the diaphragm shifted against the CT
        zd, half = float(body.z(470.0)), 60.0
        zs = cv.origin[2] + np.arange(cv.shape[2]) * cv.spacing[2]
        w = np.clip(1 - np.abs(zs - zd) / half, 0, 1).astype(np.float32)
        k = np.nonzero(w)[0]
        if k.size:
            part = act[:, :, k[0]:k[-1] + 1]
            shifted = ndimage.shift(part, (0, 0, misreg / cv.spacing[2]), order=1, mode="nearest")
            act = act.copy()
            act[:, :, k[0]:k[-1] + 1] = part + w[k[0]:k[-1] + 1] * (shifted - part)
    fwhm = float(rs.uniform(4.5, 6.5))
    blurred = ndimage.gaussian_filter(act, fwhm * FWHM_2_SIGMA / cv.spacing, truncate=3.0)
    post_sigma = 2.0 * FWHM_2_SIGMA / cv.spacing
    cov = float(rs.uniform(0.08, 0.12))
    # counts per SUV unit so that CoV = 1 / sqrt(liver * c) after the post-filter
    c = 1.0 / (cov ** 2 * v["liver_suv"]) * _postfilter_variance(post_sigma)
    counts = rs.poisson(np.maximum(blurred, 0) * c).astype(np.float32) / np.float32(c)
    pet = ndimage.gaussian_filter(counts, post_sigma, truncate=3.0)
    scale = v["pet_scale"]
    pet = np.maximum(pet * np.float32(scale), 0).astype(np.float32)
    return pet, {"pet_fwhm_mm": round(fwhm, 3), "liver_cov": round(cov, 4),
                 "pet_scale": round(scale, 4), "liver_suv": round(v["liver_suv"] * scale, 3)}


def _form_ct(cv: A.Canvas, rs: np.random.Generator, body: A.Body):
    ct = ndimage.gaussian_filter(cv.hu, 0.5, truncate=2.0)
    sigma = float(rs.uniform(12, 20))
    zs = cv.origin[2] + np.arange(cv.shape[2]) * cv.spacing[2]
    sig_z = np.where(zs < body.z(700.0), 1.6 * sigma, sigma).astype(np.float32)  # pelvis
    ct += rs.standard_normal(cv.shape, dtype=np.float32) * sig_z
    fill = -1024.0 if rs.random() < 0.5 else -1000.0
    ct[(cv.tissue == A.AIR) & (cv.hu < -990)] = fill
    return ct, {"ct_noise_hu": round(sigma, 2), "ct_fill_hu": fill}


# ----------------------------------------------------------------------------- writing

def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib  # imported here: `import data.phantom` stays light

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _layout_paths(out_dir: Path, meta: dict, layout: str) -> dict[str, Path]:
    if layout == "autopet":
        d = out_dir / meta["patient_id"] / meta["study_folder"]
        return {"pet": d / "SUV.nii.gz", "ct": d / "CTres.nii.gz", "seg": d / "SEG.nii.gz",
                "organs": d / "ORGANS.nii.gz"}
    c = meta["case_id"]
    return {"ct": out_dir / "imagesTr" / f"{c}_0000.nii.gz",
            "pet": out_dir / "imagesTr" / f"{c}_0001.nii.gz",
            "seg": out_dir / "labelsTr" / f"{c}.nii.gz",
            "organs": out_dir / "organsTr" / f"{c}.nii.gz"}


def write_study(r: Rendered, out_dir: str | os.PathLike, layouts: Iterable[str] = ("autopet",)) -> None:
    """Write one rendered study atomically: all files go to a temporary folder directly under
    out_dir (where no layout reader looks) and are renamed into place, so an interrupted run
    never leaves a half-written study."""
    out_dir = Path(out_dir)
    arrays = {"pet": r.pet, "ct": r.ct, "seg": r.seg, "organs": r.organs}
    tmp = out_dir / f".tmp-{r.meta['case_id']}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for layout in layouts:
        paths = _layout_paths(out_dir, r.meta, layout)
        staged = {key: _staged(tmp, layout, p) for key, p in paths.items()}
        for key, p in staged.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            _save_nifti(arrays[key], r.affine, p)
        if layout == "autopet":  # the whole study folder is renamed into place
            final = paths["pet"].parent
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp / layout, final)
        else:
            for key, p in paths.items():
                p.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged[key], p)
    shutil.rmtree(tmp, ignore_errors=True)


def _staged(tmp: Path, layout: str, final: Path) -> Path:
    """Where a file is written before it is renamed into place: the autoPET study folder is
    staged flat (renamed as a whole); nnU-Net files keep their folder (labelsTr/<case>.nii.gz
    and organsTr/<case>.nii.gz share a name)."""
    if layout == "autopet":
        return tmp / layout / final.name
    return tmp / layout / final.parent.name / final.name


def _complete(out_dir: Path, meta: dict, layouts: Iterable[str]) -> bool:
    """Every file of the study exists in every layout (ORGANS included: folders written before
    PHANTOM_VERSION 2 have none, so their studies are rewritten)."""
    return all(p.is_file() for lay in layouts for p in _layout_paths(out_dir, meta, lay).values())


def _render_and_write(job: tuple) -> dict:
    index, size, seed, out_dir, layouts = job
    r = render(index, size, seed)
    write_study(r, out_dir, layouts)
    return r.meta


def _read_metadata(path: Path, size: str, seed: int) -> dict:
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}); delete it and rerun the generator") from err
    if old.get("size") != size or old.get("seed") != seed:
        raise DataError(f"{path.parent} holds a phantom with size={old.get('size')!r}, "
                        f"seed={old.get('seed')!r}, not size={size!r}, seed={seed}; choose "
                        "another --out_dir or delete that folder")
    return {c["index"]: c for c in old.get("cases", [])}


def _write_metadata(path: Path, size: str, seed: int, cases: dict) -> None:
    doc = {"generator": "data.phantom", "phantom_version": PHANTOM_VERSION, "size": size,
           "seed": seed, "n_cases": len(cases), "spec": "docs/phantom.md", "cases": [cases[i] for i in sorted(cases)]}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike, n_cases: int, size: str = "demo", seed: int = 0,
             layouts: Iterable[str] = ("autopet",), start_index: int = 0, workers: int = 1,
             progress: bool = True) -> list[dict]:
    """Write studies start_index .. start_index + n_cases - 1 of the phantom (size, seed) to
    out_dir and return their metadata. Studies already complete are skipped (idempotent);
    `phantom_metadata.json` is updated after every study. Study i depends only on (seed, i)."""
    _preset(size)
    layouts = tuple(layouts)
    bad = [lay for lay in layouts if lay not in ("autopet", "nnunet")]
    if bad or not layouts:
        raise DataError(f"unknown phantom layout(s) {bad or layouts}; use 'autopet' and/or 'nnunet'")
    if n_cases < 1 or start_index < 0:
        raise DataError(f"n_cases={n_cases}, start_index={start_index}: need n_cases >= 1, "
                        "start_index >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / METADATA
    cases = _read_metadata(meta_path, size, seed)
    for stale in out.glob(".tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    todo = [i for i in range(start_index, start_index + n_cases) if i not in cases
            or cases[i].get("phantom_version", 1) != PHANTOM_VERSION  # older files: rewrite
            or not _complete(out, cases[i], layouts)]
    t0 = time.time()
    jobs = [(i, size, seed, str(out), layouts) for i in todo]
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"phantom {size}", unit="study", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context(_START).Pool(min(workers, len(jobs))) as pool:
            for meta in pool.imap_unordered(_render_and_write, jobs):
                cases[meta["index"]] = meta
                _write_metadata(meta_path, size, seed, cases)
                bar.update()
    else:
        for job in jobs:
            meta = _render_and_write(job)
            cases[meta["index"]] = meta
            _write_metadata(meta_path, size, seed, cases)
            bar.update()
    bar.close()
    log.info("phantom: %d studies written, %d already complete, %.1f s (%s)", len(todo),
             n_cases - len(todo), time.time() - t0, out)
    return [cases[i] for i in range(start_index, start_index + n_cases)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.phantom", description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--n_cases", type=int, default=40)
    ap.add_argument("--size", default="demo", help="unit | demo | autopet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", default="autopet", choices=["autopet", "nnunet", "both"])
    ap.add_argument("--start_index", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    layouts = ("autopet", "nnunet") if args.layout == "both" else (args.layout,)
    try:
        metas = generate(args.out_dir, args.n_cases, size=args.size, seed=args.seed,
                         layouts=layouts, start_index=args.start_index, workers=args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_pos = sum(m["has_tumor"] for m in metas)
    print(f"{len(metas)} studies ({n_pos} with tumour) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
