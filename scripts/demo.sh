#!/usr/bin/env bash
# Set up the environment if needed, then run the main job on the embedded default model.
# Extra arguments go to `ks-lens demo` (e.g. --fast, --out DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
venv="${KS_LENS_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/ks-lens" demo "$@"
