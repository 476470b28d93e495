"""Probe sets on disk: save, load and check a layer -> probe mapping and its index."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ks_lens.errors import MetadataMismatchError, StoreError
from ks_lens.io import (
    LEGACY_PROBE_SET_INDEX,
    META_CHECKSUM,
    META_FILE,
    artifact_format,
    check_artifact_target,
    load_meta,
    read_json,
    write_directory,
    write_meta,
)
from ks_lens.probes.probe import Probe, ProbeSet
from ks_lens.types import Model


def save_probes(probes: Mapping[int, Probe], directory: str | Path) -> Path:
    """Save a layer -> probe mapping as ``layer-XX/`` artefacts plus an index (``meta.json``,
    format ``ks_lens.probe_set``) recording each member's path, hook point, metrics and metadata
    checksum.

    An older probe set in ``directory`` is replaced as a whole; a directory holding anything
    else (a single probe, other files) is refused."""
    directory = Path(directory)
    check_artifact_target(directory, "probe_set")

    def write(d: Path) -> None:
        index = {}
        for layer, probe in sorted(probes.items()):
            sub = f"layer-{layer:02d}"
            probe.save(d / sub)
            index[str(layer)] = {
                "path": sub,
                "hook_name": probe.hook_name,
                "metrics": {k: probe.metrics.get(k) for k in _INDEX_METRICS},
                # the member's own metadata checksum (it covers its tensors' SHA-256 too)
                META_CHECKSUM: read_json(d / sub / META_FILE, what="probe metadata")[META_CHECKSUM],
            }
        write_meta(d, {"probes": index}, artefact="probe_set")

    # a probe set replaces an older one as a whole: no stale layer-XX directories
    return write_directory(directory, write)


def load_probes(directory: str | Path, *, model: Model | None = None) -> ProbeSet:
    """Load a probe set saved by :func:`save_probes` (checked against ``model`` if given)."""
    directory = Path(directory)
    index = _read_index(directory)
    return ProbeSet(
        {int(k): _load_indexed(directory, index, int(k), model) for k in index["probes"]}
    )


def _read_index(directory: Path) -> dict[str, Any]:
    """A probe set's checked index: its ``meta.json``, or the ``probes.json`` of a set saved
    before 0.2.0 (read as it is: it had no checksum of its own)."""
    legacy = directory / LEGACY_PROBE_SET_INDEX
    if legacy.is_file() and not (directory / META_FILE).is_file():
        index = read_json(legacy, what="probe set index")
        if not isinstance(index, dict) or index.get("format") != "ks_lens.probe_set":
            raise StoreError(f"{directory} is not a ks-lens probe set")
    else:
        index = load_meta(directory, artefact="probe_set")
    if not isinstance(index.get("probes"), dict):
        raise StoreError(f"probe set index of {directory} lists no probes. {_RECREATE}")
    return index


_INDEX_METRICS = ("val_accuracy", "train_accuracy", "val_loss", "best_epoch")


def _load_indexed(directory: Path, index: Any, layer: int, model: Model | None) -> Probe:
    """One probe of a probe set; the index must not point at another layer's probe, and the
    member must be the one the set was saved with (its metadata checksum, recorded in the index;
    sets saved before the checksum was recorded: the metrics the index lists)."""
    entry = index["probes"][str(layer)]
    path = directory / entry["path"]
    probe = Probe.load(path, model=model)
    if probe.layer != layer:
        raise StoreError(
            f"probe set {directory} is inconsistent: its index lists layer {layer} but that "
            f"probe was trained at {probe.hook_name}. Re-create the probe set."
        )
    recorded = entry.get(META_CHECKSUM)
    if recorded is None and int(index.get("format_version", 1)) >= 2:
        raise StoreError(
            f"probe set {directory}: its index has no checksum for layer {layer}; it was "
            f"edited after saving. {_RECREATE}"
        )
    if recorded is not None:
        same = read_json(path / META_FILE, what="probe metadata").get(META_CHECKSUM) == recorded
    else:  # a set saved before checksums were recorded
        same = all(entry.get("metrics", {}).get(k) == probe.metrics.get(k) for k in _INDEX_METRICS)
    if not same:
        raise StoreError(
            f"probe set {directory}: the probe of layer {layer} ({path.name}) is not the one this "
            "set was saved with (it was replaced, e.g. copied from another run, and the index's "
            f"record of it no longer matches). {_RECREATE}"
        )
    return probe


_RECREATE = (
    "Re-create the set: ks-lens train --acts STORE --layer all --out DIR --overwrite "
    "(or ks_lens.save_probes)"
)


def load_probe_any(
    path: str | Path, *, model: Model | None = None, layer: int | None = None
) -> Probe:
    """Load a single probe directory, or one layer of a probe set (``layer`` required if several)."""
    path = Path(path)
    if artifact_format(path) == "ks_lens.probe_set":
        index = _read_index(path)
        layers = sorted(int(k) for k in index["probes"])
        if layer is None:
            if len(layers) != 1:
                raise StoreError(f"{path} holds probes for layers {layers}; choose one with layer=")
            layer = layers[0]
        if str(layer) not in index["probes"]:
            raise StoreError(f"{path} has no probe for layer {layer}; it has {layers}")
        return _load_indexed(path, index, layer, model)
    probe = Probe.load(path, model=model)
    if layer is not None and probe.layer != layer:
        raise MetadataMismatchError(f"probe at {path} is for layer {probe.layer}, not {layer}")
    return probe
