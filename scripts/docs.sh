#!/usr/bin/env bash
# Build the docs site and API reference with warnings as errors (mkdocs build --strict), in a
# virtual environment of its own (.venv-docs, KS_LENS_DOCS_VENV overrides) holding exactly the
# versions pinned in requirements/docs.txt. The site goes to build/docs-site (git-ignored).
# Extra arguments go to mkdocs build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KS_LENS_DOCS_VENV:-$root/.venv-docs}"
pins="$root/requirements/docs.txt"
stamp="$venv/.docs-requirements"
if [ ! -x "$venv/bin/mkdocs" ] || ! cmp -s "$pins" "$stamp"; then
    echo "[ks-lens] installing the docs tools into $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins"
    cp "$pins" "$stamp"
fi
cd "$root"
export NO_MKDOCS_2_WARNING=1  # mkdocs-material's banner about its successor
exec "$venv/bin/mkdocs" build --strict --site-dir "$root/build/docs-site" "$@"
