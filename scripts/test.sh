#!/usr/bin/env bash
# Set up the environment if needed, then lint, type-check, build the docs and API reference
# (scripts/docs.sh: mkdocs build --strict in .venv-docs) and run the test suite (extra arguments
# go to pytest; KS_LENS_SKIP_LINT=1 skips ruff and mypy, KS_LENS_SKIP_DOCS=1 the docs build,
# KS_LENS_TEST_WORKERS sets the number of pytest-xdist workers, 2 by default).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
venv="${KS_LENS_VENV:-$root/.venv}"
cd "$root"
if [ "${KS_LENS_SKIP_LINT:-0}" != "1" ]; then
    "$venv/bin/ruff" check ks_lens tests analysis benchmarks
    "$venv/bin/mypy" ks_lens
fi
if [ "${KS_LENS_SKIP_DOCS:-0}" != "1" ]; then
    bash "$root/scripts/docs.sh" --quiet
fi
# Two pytest-xdist workers (KS_LENS_TEST_WORKERS; 0 runs in this process), a test file per
# worker at a time so that module fixtures are built once; one thread each for the subprocesses
# the tests start (conftest.py gives each worker its share of the cores).
workers="${KS_LENS_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
    exec "$venv/bin/python" -m pytest -q "$@"
fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$venv/bin/python" -m pytest -q \
    -n "$workers" --dist loadfile "$@"
