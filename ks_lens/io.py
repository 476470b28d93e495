"""On-disk format shared by every ks-lens artefact: safetensors tensors + a JSON sidecar.

Never pickle. Every write is atomic (temporary file, fsync, rename), so a crash leaves either the
old file or the new one, never a half-written file that looks complete.

An artefact directory holds ``tensors.safetensors`` and ``meta.json`` (an index, such as a probe
set's, holds ``meta.json`` alone, beside its members' directories). ``meta.json`` carries a
``format`` tag, the artefact's metadata (model, hook point, layer, label names, dataset hash, ...),
the versions that produced it, the size and SHA-256 of the tensor file, and (format version 2) a
SHA-256 of its own contents (``meta_sha256``); loading checks all three. A directory holds one
artefact: saving over another artefact (or over unrelated files) is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ks_lens.compat import check_version_match, versions
from ks_lens.errors import DatasetError, StoreError
from ks_lens.utils import renamed

TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
#: ``format_version`` written in every ``meta.json`` (2: with its ``meta_sha256``)
FORMAT_VERSION = 2
#: the index file of probe sets saved before 0.2.0 (now their ``meta.json``); still read
LEGACY_PROBE_SET_INDEX = "probes.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (same-directory temp file + ``os.replace``).

    A failed write that names no file (a full disk) is raised as an ``OSError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _strict(obj: Any) -> Any:
    """NaN and infinities become ``null``: the files stay valid (strict) JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


META_CHECKSUM = "meta_sha256"


def meta_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of a metadata record (without its own checksum field), as canonical JSON."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    text = json.dumps(_strict(body), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def with_meta_checksum(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` plus a ``meta_sha256`` field covering everything else in it."""
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return {**body, META_CHECKSUM: meta_checksum(body)}


def check_meta_checksum(meta: Mapping[str, Any], path: str | Path, what: str) -> None:
    """Refuse metadata edited after saving (e.g. reordered label names, which would silently
    swap labels). Records of format version 1 predate the checksum and are accepted."""
    recorded = meta.get(META_CHECKSUM)
    if recorded is None:
        if int(meta.get("format_version", 1)) >= 2:
            raise StoreError(
                f"{what} {path} has no metadata checksum ({META_CHECKSUM}); it was edited or "
                "damaged after saving. Re-create it."
            )
        return
    if recorded != meta_checksum(meta):
        raise StoreError(
            f"{what} {path} was modified after saving: its contents no longer match the recorded "
            f"{META_CHECKSUM} (hand edits such as reordered label names would silently change "
            "results). Re-create it."
        )


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN/inf as ``null``), atomically."""
    text = json.dumps(_strict(obj), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """``safetensors.torch.save_file`` made atomic; tensors are made contiguous and moved to CPU."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
        except SafetensorError as e:
            raise _as_os_error(e, path) from e
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _as_os_error(e: SafetensorError, path: Path) -> OSError:
    """safetensors reports a failed write (a full disk, ...) as ``SafetensorError("Error while
    serializing: I/O error: No space left on device (os error 28) ...")``: the ``OSError`` it
    stands for, naming ``path``, so callers see the usual one-line file-system error."""
    found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(e))
    if found:
        return OSError(int(found.group(2)), found.group(1), str(path))
    return OSError(errno.EIO, f"cannot write the tensors ({e})", str(path))


def write_directory(directory: str | Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a fresh sibling directory, then put it in place of ``directory``.

    Whatever ``directory`` held before is replaced as a whole, so a crash or an error never leaves
    old and new files mixed; ``write`` failing leaves the old contents untouched. An ``OSError``
    that names no file or a file in the temporary directory (a full disk while writing) is raised
    again naming ``directory``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        try:
            write(tmp)
        except OSError as e:
            if e.filename is not None and not str(e.filename).startswith(str(tmp)):
                raise
            raise OSError(e.errno, e.strerror or str(e), str(directory)) from e
        if directory.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(
            f"{what} {path} is not valid JSON ({e}); it is corrupt or truncated"
        ) from e


def load_safetensors(path: str | Path, what: str = "tensor file") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StoreError(f"{what} {path} cannot be read ({e}); it is corrupt or truncated") from e


@renamed(kind="artefact")
def save_artifact(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    artefact: str,
) -> Path:
    """Save ``tensors`` + ``meta`` as an artefact directory, format ``ks_lens.{artefact}``.

    The tensor file is written first and the JSON last, so ``meta.json`` existing means the
    artefact is complete; its recorded checksum catches later damage.
    """
    directory = Path(directory)
    check_artifact_target(directory, artefact)
    directory.mkdir(parents=True, exist_ok=True)
    tpath = directory / TENSORS_FILE
    atomic_save_safetensors(tpath, tensors)
    tensors_record = {
        "file": TENSORS_FILE,
        "bytes": tpath.stat().st_size,
        "sha256": sha256_file(tpath),
    }
    write_meta(directory, meta, artefact=artefact, tensors=tensors_record)
    return directory


@renamed(kind="artefact")
def write_meta(
    directory: str | Path,
    meta: Mapping[str, Any],
    *,
    artefact: str,
    tensors: Mapping[str, Any] | None = None,
) -> None:
    """Write the ``meta.json`` of an ``artefact`` (``"probe"``, ...): format tag and version,
    ``meta``, the versions writing it, the tensor file's record (``tensors``: file, bytes,
    sha256; ``None`` for an index such as a probe set's, whose members are artefacts of their
    own) and the checksum.
    ``directory`` is not checked: :func:`save_artifact` (or the caller) has done that."""
    record: dict[str, Any] = {
        "format": f"ks_lens.{artefact}",
        "format_version": FORMAT_VERSION,
        **dict(meta),
        "versions": versions(),
    }
    if tensors is not None:
        record["tensors"] = dict(tensors)
    atomic_write_json(Path(directory) / META_FILE, with_meta_checksum(record))


def artifact_format(directory: str | Path) -> str | None:
    """What a directory holds: ``"ks_lens.probe"``, ``"ks_lens.probe_set"``, ...; ``""`` for an
    empty or missing directory; ``None`` for anything else (other files, unreadable metadata)."""
    directory = Path(directory)
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return ""
    if not directory.is_dir():
        return None
    for name in (META_FILE, LEGACY_PROBE_SET_INDEX):
        p = directory / name
        if p.is_file():
            try:
                found = json.loads(p.read_text()).get("format")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
                return None
            return str(found) if isinstance(found, str) and found.startswith("ks_lens.") else None
    return None


@renamed(kind="artefact")
def check_artifact_target(directory: str | Path, artefact: str) -> None:
    """Refuse to write an ``artefact`` (``"probe"``, ...) where it would mix with something else:
    a file, a directory of other files, or another artefact (say a probe set, whose index would
    keep pointing at its old probes). Replacing an artefact of the same format is allowed."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"{directory} is an existing file; a {artefact} is saved as a directory")
    found = artifact_format(directory)
    if found not in ("", f"ks_lens.{artefact}"):
        what = f"a {found.removeprefix('ks_lens.')}" if found else "other files"
        raise StoreError(
            f"{directory} already holds {what}; saving a {artefact} there would leave a mixed "
            "directory. Choose another directory, or delete that one first."
        )


@renamed(kind="artefact")
def load_meta(directory: str | Path, *, artefact: str) -> dict[str, Any]:
    """The checked ``meta.json`` of an ``artefact`` (``"probe"``, ...): its format, metadata
    checksum and the versions that wrote it (a mismatch warns); the tensor file is not read."""
    directory = Path(directory)
    if not directory.exists():
        raise StoreError(f"no {artefact} found at {directory}")
    if directory.is_file():
        raise StoreError(f"{directory} is a file; a {artefact} is a directory with {META_FILE}")
    meta = read_json(directory / META_FILE, what=f"{artefact} metadata")
    if not isinstance(meta, dict) or meta.get("format") != f"ks_lens.{artefact}":
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise StoreError(f"{directory} holds {found!r}, not a ks_lens.{artefact}")
    check_meta_checksum(meta, directory / META_FILE, f"{artefact} metadata")
    check_version_match(meta.get("versions"), f"{artefact} {directory}")
    return meta


@renamed(kind="artefact")
def load_artifact(
    directory: str | Path, *, artefact: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an artefact saved by :func:`save_artifact`, checking its format, size and checksum."""
    directory = Path(directory)
    meta = load_meta(directory, artefact=artefact)
    record = meta.get("tensors")
    if not isinstance(record, dict):
        raise StoreError(
            f"{artefact} metadata {directory / META_FILE} records no tensor file; it is not a "
            f"complete {artefact}. Re-create it."
        )
    tpath = directory / str(record.get("file"))
    if not tpath.is_file():
        raise StoreError(f"{artefact} tensor file missing: {tpath}")
    if tpath.stat().st_size != record.get("bytes") or sha256_file(tpath) != record.get("sha256"):
        raise StoreError(
            f"{artefact} tensor file {tpath} does not match its recorded checksum; it is corrupt "
            "or was modified after saving. Re-create it."
        )
    return load_safetensors(tpath, what=f"{artefact} tensors"), meta


def read_text_file(path: str | Path, what: str) -> str:
    """A text file's contents, decoded as UTF-8 (a BOM is allowed).

    Raises :class:`DatasetError` naming the file (and, for bad bytes, the line) when it is
    missing, a directory, or not UTF-8; ``what`` says what kind of file was expected.
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a directory; expected a {what}")
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DatasetError(
            f"{path}:{line}: byte 0x{data[e.start]:02x} is not valid UTF-8{hint}; expected "
            "UTF-8 text: re-save the file as UTF-8"
        ) from None


def iter_jsonl(path: str | Path, what: str) -> Iterator[tuple[str, Any]]:
    """``(location, parsed object)`` for every non-blank line of a JSONL file, where location is
    ``"file:line"``; decoding and malformed lines raise :class:`DatasetError` naming it."""
    for lineno, line in enumerate(read_text_file(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{loc}: malformed JSON line ({e.msg})") from None
