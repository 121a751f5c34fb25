"""Check a PET/CT data folder: read every study and report every problem at once.

    python -m data.check /data/autoPET
    python -m data.check /data/Dataset221_autoPET --layout=nnunet --ct_channel=0 --pet_channel=1
    python -m data.check /data/dicom --layout=dicom --require_mask=False --resample=True

Prints one line per bad study and a summary; exit code 1 if any study is bad, 0 if all are
fine, 2 if the folder itself cannot be scanned. Reads one study at a time; writes nothing.
"""
from __future__ import annotations

import argparse
import ast
import logging
import sys

from tqdm import tqdm

from .io import load_study, scan_studies
from .study import DataError, StudyRef


def check_dataset(data_dir: str, layout: str = "auto", ct_channel: int = 0, pet_channel: int = 1,
                  require_mask: bool = True, resample: bool = False) -> list[tuple[StudyRef | str, str]]:
    """Load every study of `data_dir`; return [(ref or location, message)] for every bad one.

    Structural problems (missing SEG, a DICOM study without PET, ...) come first, with the
    location as a string; then one entry per study that fails `load_study`. Empty list = all good.
    A DataError is raised only when the folder itself cannot be scanned (missing, no studies).
    """
    return _check(data_dir, layout, ct_channel, pet_channel, require_mask, resample)[0]


def _check(data_dir, layout, ct_channel, pet_channel, require_mask, resample, progress=False):
    refs, problems = scan_studies(data_dir, layout, ct_channel, pet_channel, require_mask)
    if not refs and not problems:
        raise DataError(f"{data_dir}: no studies found (layout {layout}); check the folder")
    bad: list[tuple[StudyRef | str, str]] = list(problems)
    for ref in tqdm(refs, desc="checking studies", unit="study", disable=not progress):
        try:
            load_study(ref, resample=resample)
        except DataError as e:
            bad.append((ref, str(e)))
    return bad, len(refs) + len(problems)


def _bool(text: str) -> bool:
    value = ast.literal_eval(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.check", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--layout", default="auto", choices=["auto", "autopet", "nnunet", "dicom", "png"])
    parser.add_argument("--ct_channel", type=int, default=0)
    parser.add_argument("--pet_channel", type=int, default=1)
    parser.add_argument("--require_mask", type=_bool, default=True)
    parser.add_argument("--resample", type=_bool, default=False)
    args = parser.parse_args(argv)
    try:
        bad, n_studies = _check(args.data_dir, args.layout, args.ct_channel, args.pet_channel,
                                       args.require_mask, args.resample, progress=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for where, message in bad:
        name = where.case_id if isinstance(where, StudyRef) else where
        print(f"BAD {name}: {message}")
    print(f"checked {n_studies} studies in {args.data_dir}: {len(bad)} bad, {n_studies - len(bad)} ok")
    return 1 if bad else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
