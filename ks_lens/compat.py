"""Versions: which packages determine ks-lens's numbers, and the combinations known to be wrong.

- :func:`versions` is recorded in every artefact, report and benchmark.
- :func:`check_version_match` warns when an artefact was saved under another major version.
- :func:`cache_keyword` hands a KV cache to a Hugging Face model under the keyword its
  transformers release takes (``past_key_values`` before 5.24, ``cache`` from 5.24 on).
- :func:`check_bridge_cache` refuses TransformerLens bridge passes with a KV cache where the
  installed transformers and TransformerLens are known to diverge from plain Hugging Face.
"""

from __future__ import annotations

import functools
import inspect
import platform
import warnings
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import InvalidVersion, Version

from ks_lens.errors import VersionError, VersionMismatchWarning
from ks_lens.utils import UNKNOWN_VERSION, package_version

NOT_INSTALLED = "not installed"

# Distributions whose versions can change ks-lens's numbers (record key -> distribution name).
NUMERIC_PACKAGES: dict[str, str] = {
    "ks_lens": "ks-lens",
    "torch": "torch",
    "transformers": "transformers",
    "transformer_lens": "transformer-lens",
    "scikit_learn": "scikit-learn",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
}


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``"not installed"``."""
    if dist == "ks-lens":
        return package_version()
    try:
        return version(dist)
    except PackageNotFoundError:
        return NOT_INSTALLED


def versions() -> dict[str, str]:
    """Versions of the packages that determine numerical results, and Python's."""
    return {
        **{key: dist_version(dist) for key, dist in NUMERIC_PACKAGES.items()},
        "python": platform.python_version(),
    }


def _parse(v: str) -> Version | None:
    try:
        return Version(v)
    except InvalidVersion:
        return None


def major(v: str) -> str | None:
    """The part of a version that signals breaking changes: ``"5"`` for 5.23.0, ``"0.1"`` for
    0.1.0 (before 1.0 the minor number breaks); ``None`` for an unparsable version."""
    parsed = _parse(v)
    if parsed is None:
        return None
    rel = parsed.release
    return f"0.{rel[1] if len(rel) > 1 else 0}" if rel[0] == 0 else str(rel[0])


def version_mismatches(recorded: Mapping[str, Any]) -> list[str]:
    """``"transformers 4.57.1 (saved) vs 5.23.0 (installed)"`` for each package whose major version
    differs between ``recorded`` (an artefact's ``versions``) and what is installed."""
    now = versions()
    out = []
    for key in NUMERIC_PACKAGES:
        saved = recorded.get(key)
        if not isinstance(saved, str) or saved in (NOT_INSTALLED, UNKNOWN_VERSION):
            continue
        current = now[key]
        if current in (NOT_INSTALLED, UNKNOWN_VERSION):
            continue
        a, b = major(saved), major(current)
        if a is not None and b is not None and a != b:
            out.append(f"{key} {saved} (saved) vs {current} (installed)")
    return out


def check_version_match(recorded: Any, what: str) -> None:
    """Warn (:class:`~ks_lens.errors.VersionMismatchWarning`) when the artefact ``what`` was saved
    under another major version of a package that determines its numbers."""
    if not isinstance(recorded, Mapping):
        return
    diffs = version_mismatches(recorded)
    if diffs:
        warnings.warn(
            f"{what} was saved under other major versions: {'; '.join(diffs)}. Its numbers may "
            "differ under the installed versions; regenerate it to be sure.",
            VersionMismatchWarning,
            stacklevel=3,
        )


@functools.cache
def _takes_cache(cls: Any) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_keyword(hf_model: Any) -> str:
    """The keyword under which ``hf_model.forward`` takes a KV cache: ``"cache"`` in transformers
    5.24 and later (``past_key_values`` is deprecated there), else ``"past_key_values"``."""
    cls: Any = type(hf_model)
    return "cache" if _takes_cache(cls) else "past_key_values"


# TransformerLens's bridge attention reads the cache from ``past_key_values``; from transformers
# 5.24 on the model passes it as ``cache``, so the bridge attends only to the current token during
# cached decoding. Measured: 5.24.0 and 5.25.0 with transformer-lens 4.3.0 diverge from plain
# HF from the first new token; 5.23.0 agrees exactly (tests/test_parity.py).
BRIDGE_CACHE_FIRST_BAD_TRANSFORMERS = Version("5.24")
BRIDGE_CACHE_LAST_CHECKED_TL = Version("4.3.0")


def bridge_cache_diverges() -> bool:
    """Whether the installed transformers + TransformerLens are known to compute wrong results
    in bridge forward passes that use a KV cache (TransformerLens releases after the last one
    checked are assumed fixed)."""
    hf, tl = _parse(dist_version("transformers")), _parse(dist_version("transformer-lens"))
    if hf is None or tl is None:
        return False
    return hf >= BRIDGE_CACHE_FIRST_BAD_TRANSFORMERS and tl <= BRIDGE_CACHE_LAST_CHECKED_TL


def bridge_cache_message() -> str:
    return (
        f"transformer-lens {dist_version('transformer-lens')} with transformers "
        f"{dist_version('transformers')}: the TransformerLens bridge ignores the KV cache (known to "
        "diverge from Hugging Face from the first generated token with transformers >= 5.24 and "
        "transformer-lens <= 4.3.0)"
    )


def check_bridge_cache() -> None:
    """Refuse a bridge pass with a KV cache under versions known to give wrong results."""
    if bridge_cache_diverges():
        raise VersionError(
            f"full_bridge=True with a KV cache gives wrong results here: {bridge_cache_message()}. "
            "Use the default path (full_bridge=False, equal to plain Hugging Face), or install the "
            "locked versions with `bash scripts/setup-env.sh` (requirements/lock.txt)."
        )
