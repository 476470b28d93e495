"""Tensors parked in a temporary file until they are needed, so they do not stay resident.

The text level compares each steered answer's next-token distributions (``[steps, vocab]``
float32, 6.5 MB per 32-token answer on a 49k vocabulary) with the unsteered model's, which
exist only once every answer to the same question has been generated. :class:`SpillList` keeps
those distributions in an unnamed temporary file (written with ``pwrite`` and read with
``preadv``, so they sit in the page cache, which the kernel may drop, and not in the process's
resident memory) and gives back bitwise the same tensor. Slots of freed items are reused, so the
file grows with the items held at once, not with every item ever stored.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from ks_lens.errors import ConfigError


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor of any dtype, as a uint8 array sharing its memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


class SpillList:
    """A fixed-length list of CPU tensors (or ``None``) stored in a temporary file.

    ``items[i] = t`` writes ``t``; ``items[i]`` reads it back as a new tensor (bitwise equal,
    same dtype and shape); ``items[i] = None`` frees its slot for reuse. Close it (or use it as
    a context manager) to delete the file; the file is unnamed, so it also disappears when the
    process ends, however it ends.
    """

    def __init__(self, n: int, *, directory: str | os.PathLike[str] | None = None) -> None:
        if n < 0:
            raise ConfigError(f"a spill list needs a length >= 0, got {n}")
        self._file = tempfile.TemporaryFile(dir=directory)
        self._fd = self._file.fileno()
        self._where: list[tuple[int, int, tuple[int, ...], torch.dtype] | None] = [None] * n
        self._free: list[tuple[int, int]] = []  # (offset, capacity) of freed slots
        self._end = 0

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return (self[i] for i in range(len(self)))

    @property
    def file_bytes(self) -> int:
        """Bytes the file has grown to (the largest total held at once, with slot slack)."""
        return self._end

    def _release(self, i: int) -> None:
        where = self._where[i]
        if where is not None:
            self._free.append((where[0], where[1]))
            self._where[i] = None

    def _slot(self, nbytes: int) -> tuple[int, int]:
        """A free slot of at least ``nbytes`` (the smallest that fits), else a new one."""
        fits = [k for k, (_, cap) in enumerate(self._free) if cap >= nbytes]
        if fits:
            k = min(fits, key=lambda k: self._free[k][1])
            return self._free.pop(k)
        offset, self._end = self._end, self._end + nbytes
        return offset, nbytes

    def __setitem__(self, i: int, value: torch.Tensor | None) -> None:
        self._release(i)
        if value is None:
            return
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"a spill list holds tensors, got {type(value).__name__}")
        raw = _bytes_of(value.detach().cpu().contiguous())
        offset, capacity = self._slot(raw.nbytes)
        written = os.pwrite(self._fd, raw.data, offset) if raw.nbytes else 0
        if written != raw.nbytes:
            raise OSError(f"short write to the spill file ({written} of {raw.nbytes} bytes)")
        self._where[i] = (offset, capacity, tuple(value.shape), value.dtype)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        where = self._where[i]
        if where is None:
            return None
        offset, _, shape, dtype = where
        out = torch.empty(shape, dtype=dtype)
        buffer = _bytes_of(out)
        read = os.preadv(self._fd, [buffer.data], offset) if buffer.nbytes else 0
        if read != buffer.nbytes:
            raise OSError(f"short read from the spill file ({read} of {buffer.nbytes} bytes)")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpillList:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SpillList"]
