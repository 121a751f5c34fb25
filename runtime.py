"""Run-time helpers shared by the entry points (main.py, test.py, sweep.py) and training.py:
device choice, seeding, environment facts, logging, torchrun/DDP set-up and the user-error
exit. Not a script. Imports stay light: config/data/models are imported only where needed.

User errors (docs/training.md "Errors"): every expected user mistake is an exception whose
class has the attribute `user_error = True` (config.ConfigError, data.DataError,
models.WeightsError, training.TrainingError, test.EvaluationError). `exit_on_user_error()`
turns those into `error: <message>` on stderr and exit code 2, without importing the modules
that define them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import random
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_KEYBOARD_INTERRUPT = 130  # 128 + SIGINT, the shell convention


def is_user_error(exc: BaseException) -> bool:
    """True for the project's expected user mistakes (classes with `user_error = True`)."""
    return bool(getattr(type(exc), "user_error", False))


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Wrap an entry point: user errors -> `error: <message>` on stderr, exit code 2, no
    traceback; Ctrl-C -> exit code 130 without a traceback; anything else propagates (a bug)."""
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_KEYBOARD_INTERRUPT)
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if not is_user_error(exc):
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_USER_ERROR)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> the first CUDA GPU if present, else the CPU; "cpu", "cuda", "cuda:1" as given.
    Asking for a GPU that is not there raises config.ConfigError naming the fix."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        from config import ConfigError
        raise ConfigError(f"--device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        from config import ConfigError
        if not torch.cuda.is_available():
            raise ConfigError(f"--device={name} asked for a GPU but torch sees none "
                              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                              "use --device=cpu or --device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device={name}: only {torch.cuda.device_count()} GPU(s) visible "
                              "(cuda:0 ..); pick an existing index")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU). `deterministic` also turns on
    `torch.use_deterministic_algorithms(True)` (an op without a deterministic kernel then raises),
    cuDNN's deterministic mode and the cuBLAS workspace setting it needs; otherwise cuDNN may
    benchmark kernels (faster, not bit-reproducible on GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # must be set before the first cuBLAS call; harmless on CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles: Intel Xeon
    from Cooper / Sapphire Rapids, AMD Zen 4), where oneDNN runs bf16 convolutions and matrix
    products faster than float32. Elsewhere bf16 autocast is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:
        return False


def resolve_amp(amp: Any, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of a run (training, validation and evaluation use the same one).

    "auto": on CUDA bf16 where supported, else fp16 (with GradScaler); on a CPU bf16 where the
    CPU has it in hardware (`cpu_has_native_bf16`), else None (float32). True: as "auto", but
    CUDA is required. "bf16" / "fp16" force one (fp16 only on CUDA); False / "off" -> None.
    The loss and the sigmoid are always computed in float32, the master weights stay float32."""
    if amp in (False, None, "off", "False", "false"):
        return None
    from config import ConfigError
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16"):
        if device.type != "cuda":
            raise ConfigError("--amp=fp16 needs a CUDA device; on a CPU use --amp=bf16 or --amp=False")
        return torch.float16
    if amp not in ("auto", True, "True", "true"):
        raise ConfigError(f"--amp={amp!r}: choose auto, True, False, bf16 or fp16")
    if device.type != "cuda":
        if amp == "auto":
            return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
        raise ConfigError("--amp=True needs a CUDA device; use --amp=auto, --amp=bf16 or "
                          "--amp=False on a CPU")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_flag(value: Any, device: torch.device) -> bool:
    """"auto" -> True on CUDA, False elsewhere (channels_last)."""
    if value == "auto":
        return device.type == "cuda"
    return value in (True, "True", "true")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """The repo's HEAD commit (with "+dirty" if the work tree has changes), or None quietly."""
    repo_dir = Path(repo_dir or Path(__file__).resolve().parent)
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=repo_dir, capture_output=True,  # noqa: E731
                                           text=True, timeout=5, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_facts() -> dict:
    """Versions, hardware and commit saved with every run (config.json, checkpoints)."""
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "numpy": np.__version__,
        "timm": _version("timm"),
        "segmentation_models_pytorch": _version("segmentation-models-pytorch"),
        "medpy": _version("medpy"),
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),  # what --amp=auto resolves to on this CPU
        "platform": platform.platform(),
    }


_HANDLER_TAG = "_runtime_handler"


def setup_logging(run_dir: str | Path | None = None, rank: int = 0, level: int = logging.INFO) -> None:
    """Console logging on rank 0 (warnings only on the others) plus `run_dir/train.log` on rank 0.
    Idempotent: calling it again replaces the handlers it added before, never duplicates them."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(level if rank == 0 else logging.WARNING)
    if run_dir is not None and rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8"))
        handlers[-1].setLevel(level)
    for handler in handlers:
        handler.setFormatter(fmt)
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    root.setLevel(min(level, root.level) if root.level != logging.NOTSET else level)


# ---- torchrun / DDP ----------------------------------------------------------------------


def distributed_setup(device: str = "auto", timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """Join the process group when started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK set).

    Returns (rank, world_size, device). Without torchrun: (0, 1, resolve_device(device)).
    Backend NCCL on CUDA, gloo on CPU; each rank uses GPU LOCAL_RANK. The timeout is long
    because only rank 0 validates while the others wait at a barrier.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, resolve_device(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = resolve_device(device).type
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        local = torch.device("cuda", local_rank)
    else:
        local = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes),
                                **({"device_id": local} if device_type == "cuda" else {}))
    return rank, world_size, local


def distributed_cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()
