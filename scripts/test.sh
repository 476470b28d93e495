#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
venv="${KS_LENS_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/python" -m pytest -q "$@"
