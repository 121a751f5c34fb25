"""data/: PET/CT readers, validation, phantom, preprocessing cache, split and slice datasets.

    from data import find_studies, load_study
    study = load_study(find_studies("/data/autoPET")[0])   # ct (HU), pet (SUV), mask on one grid

pydicom, scipy and PIL load on first use; the slice dataset needs torch.
"""
from .cache import CachedStudy, load_cached, prepare_cache
from .dataset import PetCtSliceDataset, from_model_grid, to_model_grid, worker_init_fn
from .io import find_studies, load_study
from .split import load_split, save_split, split_cases
from .study import DataError, Study, StudyRef
