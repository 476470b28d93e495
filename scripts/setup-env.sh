#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install ks-lens into it, with every
# dependency at the version pinned in requirements/lock.txt (scripts/lock.sh refreshes the lock).
# Idempotent: a second run only checks the stamp of what was installed.
#
#   KS_LENS_VENV        where the venv lives (default: .venv in the repository)
#   KS_LENS_TORCH_SPEC  the torch requirement (default: torch==2.13.0, the CPU build this
#                       project is locked to; e.g. "torch==2.13.0" from a CUDA index for a GPU)
#   KS_LENS_EXTRAS      extras to install (default: dev)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KS_LENS_VENV:-$root/.venv}"
torch_spec="${KS_LENS_TORCH_SPEC:-torch==2.13.0}"
extras="${KS_LENS_EXTRAS:-dev}"
python="${PYTHON:-python3}"
lock="$root/requirements/lock.txt"

if [ ! -x "$venv/bin/python" ]; then
    echo "[ks-lens] creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.ks-lens-installed"
want="$(cat "$root/pyproject.toml" "$lock" | sha256sum | cut -c1-16) $torch_spec $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from its own spec: an unpinned torch pulled in by a dependency is a multi-GB CUDA
# build, and the lock's CPU pin (+cpu) exists only where that build is served.
echo "[ks-lens] installing $torch_spec" >&2
"$venv/bin/python" -m pip install -q "$torch_spec"
echo "[ks-lens] installing the locked dependencies ($lock)" >&2
grep -v -i -E '^torch==' "$lock" > "$venv/.ks-lens-lock.txt"
"$venv/bin/python" -m pip install -q -r "$venv/.ks-lens-lock.txt" "$torch_spec"
echo "[ks-lens] installing ks-lens[$extras] (editable, no further dependencies)" >&2
"$venv/bin/python" -m pip install -q --no-deps -e "$root[$extras]"
"$venv/bin/python" -m pip check >&2
echo "$want" > "$stamp"
