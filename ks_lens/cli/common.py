"""What the ``ks-lens`` commands share: the model options spelled ``--model``, ``--device`` and
``--dtype`` (:data:`Model`), the check of ``--out`` before any work, and the one-line message
for an ``OSError``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import tyro

from ks_lens.errors import ConfigError
from ks_lens.models import ModelOptions

#: the model options, spelled --model, --device and --dtype (no prefix)
Model = Annotated[ModelOptions, tyro.conf.arg(name="")]


def _describe_os_error(e: OSError) -> str:
    """``"runs/x: Permission denied"`` for an ``OSError`` (no errno number, no traceback)."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return what
    name = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{name}: {what}"


_ARTEFACT_NAMES = {
    "ks_lens.probe": "a probe",
    "ks_lens.probe_set": "a probe set",
    "ks_lens.steering_vectors": "steering vectors",
    "ks_lens.activation_store": "an activation store",
    "ks_lens.text_evaluator": "a text evaluator",
}


def _check_out(
    path: str, *, holds: tuple[str, ...] = (), what: str = "", overwrite: bool = False
) -> Path:
    """Check ``--out`` before any work: not a file, writable, and (for artefacts) either new,
    or holding one of the artefact formats ``holds`` and ``overwrite`` given."""
    from ks_lens.io import artifact_format

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; give a directory path")
    if holds:
        found = artifact_format(out)
        if found is None:
            raise ConfigError(
                f"--out {out} is a non-empty directory that does not hold {what}; "
                "choose a new or empty directory"
            )
        name = _ARTEFACT_NAMES.get(found, found)
        if found and found not in holds:
            raise ConfigError(f"--out {out} holds {name}, not {what}; choose another directory")
        if found and not overwrite:
            raise ConfigError(
                f"--out {out} already holds {name}; pass --overwrite to replace it, or choose "
                "another directory"
            )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot write in {parent} ({e.strerror or e}); choose a writable directory"
        ) from None
    return out
