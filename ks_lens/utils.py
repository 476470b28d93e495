"""Small helpers shared by the package: devices, dtypes, seeds, version stamps, renamed names."""

from __future__ import annotations

import functools
import numbers
import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from ks_lens.errors import ConfigError, RenamedError, WrongTypeError

_P = ParamSpec("_P")
_R = TypeVar("_R")
_C = TypeVar("_C", bound=type)

#: what :func:`package_version` reports when ks-lens runs from a source tree it was not installed from
UNKNOWN_VERSION = "0+unknown"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` picks CUDA when it is available, otherwise the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {str(device)!r} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} requested but MPS is not available here")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``None`` means float32 (the safe default for probes and gradients)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


#: seeds are integers in [0, MAX_SEED]: what torch, NumPy and scikit-learn all accept
MAX_SEED = 2**32 - 1


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int``: an integer (Python or NumPy; not a bool, not a float such as 2.5,
    which would be silently rounded somewhere) of at least ``minimum``.

    Raises:
        WrongTypeError: not an integer. ConfigError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise WrongTypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an ``int`` in ``[0, MAX_SEED]``, refused before anything is computed or saved
    (a larger one overflows inside torch after minutes of work)."""
    value = check_int(seed, name, minimum=0)
    if value > MAX_SEED:
        raise ConfigError(f"{name} must be an integer from 0 to {MAX_SEED}, got {value}")
    return value


@lru_cache(maxsize=1)
def package_version() -> str:
    """The installed ks-lens distribution's version (``importlib.metadata``), the single source of
    ``ks_lens.__version__``; ``"0+unknown"`` when ks-lens is imported from a source tree that
    was never installed (``pip install -e .`` records the version of ``pyproject.toml``)."""
    try:
        return version("ks-lens")
    except PackageNotFoundError:
        return UNKNOWN_VERSION


def machine_info() -> dict[str, Any]:
    """Cores, threads and accelerator, for benchmark and run records."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def git_commit() -> str:
    """The repository's short commit (``+dirty`` with uncommitted changes), or ``"unknown"``."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def check_d_model(got: Any, expected: int, arg: str, what: str) -> None:
    """Raise :class:`~ks_lens.errors.ConfigError` unless the last dimension of ``got`` (a tensor,
    or an int size) is ``expected``; the message names the argument ``arg`` and ``what`` set the
    expected size (e.g. ``"the probe (trained at blocks.2.hook_resid_post)"``)."""
    from ks_lens.errors import ConfigError

    size = int(got.shape[-1]) if hasattr(got, "shape") and len(got.shape) else got
    if size != expected:
        shape = f" (shape {tuple(got.shape)})" if hasattr(got, "shape") else ""
        raise ConfigError(
            f"{arg} has last dimension {size}{shape}, but {what} expects d_model = {expected}; "
            "pass activations of the model and hook point it was made for"
        )


def refuse_renamed(where: str, renames: Mapping[str, str], given: Mapping[str, Any]) -> None:
    """Raise :class:`~ks_lens.errors.RenamedError` if ``given`` (keyword arguments) uses an old
    name of ``renames`` (old name -> new name); ``where`` names the function or class."""
    for old, new in renames.items():
        if old in given:
            raise RenamedError(f"{where}: {old}= was renamed in ks-lens 0.2.0; pass {new}= instead")


def renamed(**renames: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """A function whose keyword arguments ``renames`` (old name -> new name) were renamed:
    ``@renamed(position="pooling")`` makes ``f(position=...)`` raise
    :class:`~ks_lens.errors.RenamedError` naming ``pooling=``."""

    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            refuse_renamed(fn.__qualname__, renames, kwargs)
            return fn(*args, **kwargs)

        return call

    return wrap


def renamed_fields(**renames: str) -> Callable[[_C], _C]:
    """A dataclass whose fields ``renames`` (old name -> new name) were renamed (put it above
    ``@dataclass``): constructing it, or ``dataclasses.replace`` on it, with an old name raises
    :class:`~ks_lens.errors.RenamedError` naming the new one."""

    def wrap(cls: _C) -> _C:
        init = vars(cls)["__init__"]  # the dataclass's own __init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            refuse_renamed(cls.__name__, renames, kwargs)
            init(self, *args, **kwargs)

        setattr(cls, "__init__", __init__)  # noqa: B010
        return cls

    return wrap
