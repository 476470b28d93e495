"""Reader for text evaluators saved by ks-lens 0.1 (``vocabulary.json``, a ``checksum`` key).

ks-lens 0.1 saved a :class:`~ks_lens.text_evaluator.TextEvaluator` in a layout of its own:
``tensors.safetensors`` (IDF weights, scaler, coefficients), ``vocabulary.json`` (each
vectorizer's terms in column order) and a ``meta.json`` with ``format_version`` 1, a ``files``
record (size and SHA-256 of the two other files) and a ``checksum`` over the rest of itself,
computed on compact sorted JSON with non-ASCII characters kept as they are. Evaluators are now
saved like every other artefact (:mod:`ks_lens.io`); this module only reads the old layout, with
the same checks it had, so evaluators (and the default evaluator's cache) saved by 0.1 keep
loading. Nothing writes it any more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ks_lens.compat import check_version_match
from ks_lens.errors import StoreError
from ks_lens.io import META_CHECKSUM, META_FILE, TENSORS_FILE, read_json

#: the old layout's vocabulary file
V1_VOCAB_FILE = "vocabulary.json"
#: the old layout's checksum key in ``meta.json`` (now ``meta_sha256``)
V1_CHECKSUM = "checksum"
_RETRAIN = (
    "Re-train it (ks-lens train-text-evaluator, or TextEvaluator.fit(...).save(DIR)); the "
    "default evaluator's cache is rebuilt by itself"
)


def v1_checksum(meta: Mapping[str, Any]) -> str:
    """The old layout's metadata checksum: SHA-256 of ``meta`` (without the checksum itself) as
    compact, sorted, non-ASCII-preserving JSON."""
    body = {k: v for k, v in meta.items() if k != V1_CHECKSUM}
    blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def is_v1(directory: Path) -> bool:
    """Whether ``directory``'s ``meta.json`` is a text evaluator in the old layout (a
    ``checksum`` key and no ``meta_sha256``); ``False`` when it cannot be read (the current
    loader then reports why)."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and V1_CHECKSUM in meta and META_CHECKSUM not in meta


def read_v1(
    directory: Path, fmt: str
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, list[str]]]:
    """The tensors, metadata (checksum removed) and vocabularies of an old-layout evaluator.

    Args:
        directory: the evaluator directory.
        fmt: the format tag it must carry (``"ks_lens.text_evaluator"``).

    Raises:
        StoreError: another format or version, a checksum mismatch (``meta.json``, the tensor
            file or the vocabulary modified after saving), a missing file, or unreadable content.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    meta = read_json(directory / META_FILE, what="text evaluator metadata")
    if meta.get("format") != fmt or meta.get("format_version") != 1:
        raise StoreError(
            f"{directory}: text evaluator format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r} is not supported. {_RETRAIN}."
        )
    if meta.get(V1_CHECKSUM) != v1_checksum(meta):
        raise StoreError(
            f"{directory / META_FILE} does not match its checksum; it was modified after saving "
            f"or is corrupt. {_RETRAIN}."
        )
    meta = {k: v for k, v in meta.items() if k != V1_CHECKSUM}
    check_version_match(meta.get("versions"), f"text evaluator {directory}")
    try:
        blobs = {name: _checked_file(directory, name, info) for name, info in meta["files"].items()}
        tensors = st_load(blobs[TENSORS_FILE])
        vocab = json.loads(blobs[V1_VOCAB_FILE].decode("utf-8"))
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise StoreError(f"text evaluator at {directory} is incomplete or corrupt ({e!r})") from e
    return dict(tensors), meta, vocab


def _checked_file(directory: Path, name: str, info: Mapping[str, Any]) -> bytes:
    """The bytes of one recorded file, after checking its size and SHA-256."""
    p = directory / name
    if not p.is_file():
        raise StoreError(f"text evaluator file missing: {p}. {_RETRAIN}.")
    b = p.read_bytes()
    if len(b) != info["bytes"] or hashlib.sha256(b).hexdigest() != info["sha256"]:
        raise StoreError(
            f"{p} does not match its recorded checksum; it is corrupt or was modified after "
            f"saving. {_RETRAIN}."
        )
    return b
