#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install ks-lens into it.
# Idempotent: a second run only checks that everything is installed.
#
#   KS_LENS_VENV        where the venv lives (default: .venv in the repository)
#   KS_LENS_TORCH_SPEC  the torch requirement (default: torch==2.13.0, the CPU build
#                       this project is tested with; e.g. "torch" for a CUDA build)
#   KS_LENS_EXTRAS      extras to install (default: dev)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KS_LENS_VENV:-$root/.venv}"
torch_spec="${KS_LENS_TORCH_SPEC:-torch==2.13.0}"
extras="${KS_LENS_EXTRAS:-dev}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[ks-lens] creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.ks-lens-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $torch_spec $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch pulled in by a dependency is a multi-GB CUDA build.
echo "[ks-lens] installing $torch_spec" >&2
"$venv/bin/python" -m pip install -q "$torch_spec"
echo "[ks-lens] installing ks-lens[$extras] (editable)" >&2
"$venv/bin/python" -m pip install -q -e "$root[$extras]" "$torch_spec"
echo "$want" > "$stamp"
