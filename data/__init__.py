"""data/: PET/CT readers, validation, phantom, preprocessing cache, split and slice datasets.

    from data import find_studies, load_study
    study = load_study(find_studies("/data/autoPET")[0])   # ct (HU), pet (SUV), mask on one grid

Importing the package is light (numpy, nibabel); pydicom, scipy and PIL load on first use.
"""
from .io import find_studies, load_study
from .study import DataError, Study, StudyRef

try:  # removed once the modules exist
    from .cache import CachedStudy, prepare_cache
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.cache":
        raise
try:  # removed once the modules exist
    from .split import split_cases
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.split":
        raise
try:  # removed once the modules exist
    from .dataset import PetCtSliceDataset, from_model_grid, to_model_grid
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.dataset":
        raise
