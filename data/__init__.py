"""data/: PET/CT readers, validation, phantom, preprocessing cache, split and slice datasets.

    from data import find_studies, load_study
    study = load_study(find_studies("/data/autoPET")[0])   # ct (HU), pet (SUV), mask on one grid

Importing the package stays light (numpy, nibabel): the slice dataset (torch) is imported on
first use of its names, pydicom / scipy / PIL inside the functions that need them.
"""
from .cache import CachedStudy, load_cached, prepare_cache
from .io import find_studies, load_study
from .split import load_split, save_split, split_cases
from .study import DataError, Study, StudyRef

_DATASET_NAMES = ("PetCtSliceDataset", "crop_or_pad", "from_model_grid", "to_model_grid",
                  "worker_init_fn")
__all__ = ["CachedStudy", "load_cached", "prepare_cache", "find_studies", "load_study",
           "load_split", "save_split", "split_cases", "DataError", "Study", "StudyRef",
           *_DATASET_NAMES]


def __getattr__(name: str):  # PEP 562: torch is imported only by code that uses the dataset
    if name in _DATASET_NAMES:
        from . import dataset
        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
