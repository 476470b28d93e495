"""The on-disk activation store (:class:`ActivationStore`) and :func:`collect_to_store`."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ks_lens.activations.collect import (
    CollectSpec,
    Responses,
    _base_meta,
    _Chunk,
    _chunks,
    _plan,
)
from ks_lens.activations.container import Activations, Mode, Pooling
from ks_lens.compat import check_version_match, versions
from ks_lens.datasets import BehaviourDataset
from ks_lens.errors import ConfigError, StoreError
from ks_lens.io import (
    atomic_save_safetensors,
    atomic_write_json,
    check_meta_checksum,
    read_json,
    sha256_file,
    with_meta_checksum,
)
from ks_lens.models import check_signature
from ks_lens.types import Model
from ks_lens.utils import renamed

STORE_FORMAT = "ks_lens.activation_store"


_RESUME_KEYS = ("model", "numerics", "dataset", "split", "collect", "n_rows", "shard_rows")
_REQUIRED_KEYS = ("status", "model", "dataset", "collect", "n_rows", "shards")


class ActivationStore:
    """A directory of activation shards: ``meta.json`` + ``shards/shard-NNNNN.{safetensors,json}``.

    ``meta.json`` lists the complete shards with their sizes and SHA-256, and a SHA-256 of
    itself; it is rewritten atomically after each shard, and ``status`` becomes ``"complete"``
    at the end.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"no activation store at {self.path} (missing meta.json)")
        # without a trustworthy index nothing here can be verified or resumed: start over
        fix = f"Delete the directory {self.path} and rerun the collect command to re-create it."
        try:
            meta = read_json(meta_path, what="activation store metadata")
        except StoreError as e:
            raise StoreError(f"{e}. {fix}") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            held = f" (it holds {found!r})" if found else ""
            raise StoreError(f"{self.path} is not a ks-lens activation store{held}")
        try:
            check_meta_checksum(meta, meta_path, "activation store metadata")
        except StoreError as e:
            raise StoreError(f"{e} {fix}") from None
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise StoreError(f"activation store metadata {meta_path} lacks {missing}. {fix}")
        check_version_match(meta.get("versions"), f"activation store {self.path}")
        self.meta: dict[str, Any] = meta

    # -- properties
    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.meta["dataset"]["labels"])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.meta["collect"]["layers"])

    @property
    def hook_kinds(self) -> tuple[str, ...]:
        return tuple(self.meta["collect"]["hook_kinds"])

    @property
    def feature_shapes(self) -> dict[str, list[int]]:
        """One row's activation shape at each kind (stores made before non-``d_model`` kinds
        existed record none: every kind there is ``[d_model]``)."""
        recorded = self.meta.get("feature_shapes") or {}
        d = int(self.meta["model"]["d_model"])
        return {k: list(recorded.get(k, [d])) for k in self.hook_kinds}

    @property
    def n_rows_done(self) -> int:
        return sum(s["rows"][1] - s["rows"][0] for s in self.meta["shards"])

    def __repr__(self) -> str:
        c = self.meta["collect"]
        return (
            f"ActivationStore({str(self.path)!r}, model={self.meta['model']['model']!r}, mode={c['mode']!r}, "
            f"rows={self.n_rows_done}/{self.meta['n_rows']}, layers={len(self.layers)}, "
            f"status={self.meta.get('status')!r})"
        )

    # -- validation
    def check_model(self, model: Model) -> None:
        """Refuse use with a model other than the one the activations came from."""
        check_signature(self.meta["model"], model, f"activation store {self.path}")

    def problems(self) -> list[str]:
        """What is wrong with each damaged listed shard (missing, truncated, altered files)."""
        return [p for s in self.meta["shards"] if (p := _shard_problem(self.path, s))]

    def verify(self) -> None:
        """Check every listed shard's files, sizes and checksums."""
        problems = self.problems()
        if problems:
            more = f" (and {len(problems) - 1} more damaged shard(s))" if len(problems) > 1 else ""
            raise StoreError(
                f"{problems[0]}{more}; rerun the same collect command to re-collect the damaged "
                "shards (the intact ones are kept)"
            )

    # -- reading
    def load(
        self,
        *,
        layers: Sequence[int] | None = None,
        kinds: Sequence[str] | None = None,
        allow_incomplete: bool = False,
    ) -> Activations:
        """Load (some layers of) the store into memory, verifying every shard."""
        if not self.complete and not allow_incomplete:
            raise StoreError(
                f"activation store {self.path} is incomplete ({self.n_rows_done}/{self.meta['n_rows']} rows); "
                "rerun the same collect command to finish it, or pass allow_incomplete=True"
            )
        self.verify()
        kinds = tuple(kinds or self.hook_kinds)
        for k in kinds:
            if k not in self.hook_kinds:
                raise StoreError(f"store has no {k!r} activations; it has {list(self.hook_kinds)}")
        all_layers = self.layers
        want = tuple(all_layers if layers is None else layers)
        for layer in want:
            if layer not in all_layers:
                raise StoreError(
                    f"layer {layer} is not in the store; it has layers {list(all_layers)}"
                )
        cols = [all_layers.index(x) for x in want]
        spans = _column_spans(cols)
        shapes = self.feature_shapes
        acts: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
        labels: list[int] = []
        qids: list[str] = []
        texts: list[str | None] = []
        for s in self.meta["shards"]:
            with safe_open(str(self.path / s["tensors"]["file"]), framework="pt") as f:
                for k in kinds:
                    sl = f.get_slice(k)
                    n_shard = s["rows"][1] - s["rows"][0]
                    if list(sl.get_shape()) != [n_shard, len(all_layers), *shapes[k]]:
                        raise StoreError(
                            f"{self.path / s['tensors']['file']}: {k!r} has shape "
                            f"{sl.get_shape()}, but the store metadata says "
                            f"[{n_shard}, {len(all_layers)}, *{shapes[k]}]"
                        )
                    # only the wanted layers are read from the file (lazy slices per run of
                    # adjacent columns), never the whole shard
                    acts[k].append(_read_columns(sl, spans, cols, [n_shard, 0, *shapes[k]]))
            rows = json.loads((self.path / s["rows_file"]["file"]).read_text())
            labels.extend(rows["labels"])
            qids.extend(rows["question_ids"])
            texts.extend(rows.get("texts") or [None] * len(rows["labels"]))
        meta = {k: v for k, v in self.meta.items() if k not in ("shards", "meta_sha256")}
        meta["store"] = str(self.path)
        return Activations(
            {
                k: (torch.cat(v) if v else torch.empty(0, len(want), *shapes[k]))
                for k, v in acts.items()
            },
            want,
            torch.tensor(labels, dtype=torch.long),
            self.label_names,
            tuple(qids),
            tuple(texts) if any(t is not None for t in texts) else None,
            meta,
        )

    def responses(self) -> dict[tuple[str, int], list[int]]:
        """``(question_id, label) -> answer token ids`` from a response-mode store, for reuse."""
        out: dict[tuple[str, int], list[int]] = {}
        for s in self.meta["shards"]:
            rows = json.loads((self.path / s["rows_file"]["file"]).read_text())
            if rows.get("answer_ids") is None:
                raise StoreError(
                    f"{self.path} holds no generated answers (mode {self.meta['collect']['mode']!r})"
                )
            for q, lab, ids in zip(
                rows["question_ids"], rows["labels"], rows["answer_ids"], strict=True
            ):
                out[(q, int(lab))] = ids
        return out


def _column_spans(cols: Sequence[int]) -> list[tuple[int, int]]:
    """The sorted distinct ``cols`` as half-open runs of adjacent columns: [3, 4, 5, 9] ->
    [(3, 6), (9, 10)]."""
    spans: list[tuple[int, int]] = []
    for c in sorted(set(cols)):
        if spans and spans[-1][1] == c:
            spans[-1] = (spans[-1][0], c + 1)
        else:
            spans.append((c, c + 1))
    return spans


def _read_columns(
    sl: Any, spans: Sequence[tuple[int, int]], cols: Sequence[int], empty: Sequence[int]
) -> torch.Tensor:
    """Columns ``cols`` (axis 1, in that order) of a safetensors slice, reading only the
    ``spans`` that hold them (:func:`_column_spans`); ``empty`` is the shape when none."""
    if not spans:
        return torch.empty(*empty)
    parts = [sl[:, a:b] for a, b in spans]
    read = [c for a, b in spans for c in range(a, b)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out if read == list(cols) else out[:, [read.index(c) for c in cols]]


def _shard_problem(root: Path, shard: dict[str, Any]) -> str | None:
    """What is wrong with a listed shard's files (missing, truncated, altered), or ``None``."""
    for key in ("tensors", "rows_file"):
        p = root / shard[key]["file"]
        try:
            if not p.is_file():
                return f"shard file missing: {p}"
            size = p.stat().st_size
            if size != shard[key]["bytes"]:
                return f"shard file {p} is truncated or corrupt ({size} bytes, expected {shard[key]['bytes']})"
            if sha256_file(p) != shard[key]["sha256"]:
                return f"shard file {p} does not match its checksum"
        except OSError as e:
            return f"shard file {p} cannot be read ({e})"
    return None


def _shard_record(path: Path, rel: str) -> dict[str, Any]:
    p = path / rel
    return {"file": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


@renamed(position="pooling")
def collect_to_store(
    model: Model,
    dataset: BehaviourDataset,
    out: str | Path,
    *,
    mode: Mode = "prompt",
    layers: Sequence[int] | None = None,
    hook_kinds: Sequence[str] = ("resid_post",),
    pooling: Pooling = "last",
    batch_size: int = 16,
    max_new_tokens: int = 48,
    seed: int = 0,
    split: str | None = None,
    shard_rows: int = 256,
    responses: Responses | None = None,
    progress: bool = True,
    share_prefix: bool = True,
) -> ActivationStore:
    """Collect to an on-disk store, resuming an interrupted run with the same settings.

    A store with the same settings keeps every shard that verifies and collects the others
    (unfinished, missing or damaged ones, with a warning for damage), so rerunning the same call
    finishes or repairs it; the result equals an uninterrupted run. A store with other settings
    (including the model's dtype and device type) is refused. ``share_prefix`` is as in
    :func:`collect_activations`; it is recorded but, changing numbers only at float rounding,
    does not stop a resume.
    """
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ConfigError(f"shard_rows must be a positive int, got {shard_rows!r}")
    spec, rows = _plan(
        model, dataset, mode, layers, hook_kinds, pooling, batch_size, max_new_tokens, seed
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} is an existing file; an activation store is a directory")
    fresh = _fresh_meta(model, dataset, spec, split, len(rows), share_prefix, shard_rows)
    meta_path = out / "meta.json"
    if meta_path.exists():
        store = ActivationStore(out)
        _check_resumable(out, store.meta, fresh)
        resumed = _resume_meta(out, store, share_prefix)
        if resumed is None:
            return store
        meta = resumed
    else:
        if out.exists() and any(out.iterdir()):
            raise StoreError(
                f"{out} exists and is not an activation store; choose an empty or new directory"
            )
        meta = fresh
    _write_store_meta(meta_path, meta)
    done = {s["rows"][0] for s in meta["shards"]}
    starts = [lo for lo in range(0, len(rows), shard_rows) if lo not in done]
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for lo, chunk in _chunks(
        model,
        rows,
        spec,
        shard_rows,
        starts,
        responses,
        progress,
        f"collect {spec.mode} -> {out.name}",
        share_prefix,
    ):
        meta["shards"].append(_write_shard(out, lo // shard_rows, lo, chunk, spec.mode))
        meta["shards"].sort(key=lambda s: s["rows"][0])
        _write_store_meta(meta_path, meta)
    meta["status"] = "complete"
    meta["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_store_meta(meta_path, meta)
    return ActivationStore(out)


def _fresh_meta(
    model: Model,
    dataset: BehaviourDataset,
    spec: CollectSpec,
    split: str | None,
    n_rows: int,
    share_prefix: bool,
    shard_rows: int,
) -> dict[str, Any]:
    """The metadata of a new, empty store (also what a resumed store's settings must match)."""
    return {
        "format": STORE_FORMAT,
        "format_version": 2,
        "status": "incomplete",
        **_base_meta(model, dataset, spec, split, n_rows, share_prefix),
        "shard_rows": shard_rows,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shards": [],
    }


def _check_resumable(out: Path, old: dict[str, Any], fresh: dict[str, Any]) -> None:
    """StoreError when the store at ``out`` was collected with other settings than ``fresh``."""
    diffs = [k for k in _RESUME_KEYS if old.get(k) != fresh.get(k)]
    if diffs:
        detail = "; ".join(
            f"{k}: stored {old.get(k)!r} vs requested {fresh.get(k)!r}" for k in diffs
        )
        hint = ""
        if "numerics" in diffs and isinstance(old.get("numerics"), dict):
            n = old["numerics"]
            hint = f" To finish or reuse it, load the model with dtype={n.get('dtype')!r} on a {n.get('device')} device."
        raise StoreError(
            f"{out} already holds activations collected with other settings ({detail}). "
            f"Use another --out directory or delete this one.{hint}"
        )


def _resume_meta(out: Path, store: ActivationStore, share_prefix: bool) -> dict[str, Any] | None:
    """The metadata to resume the store at ``out`` with (its shards that verify; warns about
    damaged ones and removes leftover temporary files), or None when it is complete and sound."""
    old = store.meta
    # keep every shard that verifies; re-collect the missing, damaged and unfinished ones
    good, damaged = [], []
    for s in old["shards"]:
        problem = _shard_problem(out, s)
        if problem:
            damaged.append(problem)
        else:
            good.append(s)
    if store.complete and not damaged:
        return None
    if damaged:
        warnings.warn(
            f"activation store {out}: re-collecting {len(damaged)} damaged shard(s) "
            f"({damaged[0]}{', ...' if len(damaged) > 1 else ''})",
            stacklevel=3,  # collect_to_store's caller
        )
    # temporary files of writes cut short by a hard kill (SIGKILL, power loss)
    for tmp in [*out.glob(".*.tmp"), *(out / "shards").glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)
    meta = dict(old)
    meta["shards"] = good
    if good and old.get("share_prefix") != share_prefix:
        meta["share_prefix"] = "mixed"  # shards of both kinds (equal within float rounding)
    else:
        meta["share_prefix"] = share_prefix
    meta["status"] = "incomplete"
    meta.pop("completed", None)
    return meta


def _write_shard(out: Path, idx: int, lo: int, chunk: _Chunk, mode: Mode) -> dict[str, Any]:
    """Write shard ``idx`` (rows from ``lo``) of ``chunk``; its record for ``meta["shards"]``."""
    tname = f"shards/shard-{idx:05d}.safetensors"
    rname = f"shards/shard-{idx:05d}.json"
    atomic_save_safetensors(out / tname, chunk.acts)
    rows_json: dict[str, Any] = {
        "rows": [lo, lo + len(chunk.rows)],
        "question_ids": [r.question_id for r in chunk.rows],
        "labels": [r.label for r in chunk.rows],
    }
    if mode in ("response", "response-only"):
        rows_json["texts"] = chunk.texts
        rows_json["answer_ids"] = chunk.answer_ids
    atomic_write_json(out / rname, rows_json)
    return {
        "rows": [lo, lo + len(chunk.rows)],
        "tensors": _shard_record(out, tname),
        "rows_file": _shard_record(out, rname),
    }


def _write_store_meta(path: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(path, with_meta_checksum(meta))
