"""``python -m ks_lens.cli``: the ``ks-lens`` command line."""

import sys

from ks_lens.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
