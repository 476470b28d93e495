"""Where ks-lens's messages go.

The library reports progress and notices through module loggers (``logging.getLogger(__name__)``,
all under ``ks_lens``) and never prints; progress bars stay with tqdm. It does not configure
logging itself: entry points (the ``ks-lens`` command, the scripts in ``analysis/``) call
:func:`configure_logging` once, and a notebook may too::

    import ks_lens
    ks_lens.configure_logging()        # progress messages (INFO) on stderr

Without it, Python shows only warnings and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

#: verbosity levels of :func:`configure_logging`
QUIET, NORMAL, VERBOSE = -1, 0, 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (so redirection and test
    capture keep working after :func:`configure_logging`)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def level_of(verbosity: int) -> int:
    """``QUIET`` -> WARNING, ``NORMAL`` -> INFO, ``VERBOSE`` (or more) -> DEBUG."""
    if verbosity < NORMAL:
        return logging.WARNING
    return logging.INFO if verbosity == NORMAL else logging.DEBUG


def configure_logging(verbosity: int = NORMAL, *, names: Sequence[str] = ("ks_lens",)) -> None:
    """Send the messages of the loggers ``names`` (default: all of ks-lens) to stderr, one plain
    line each, at the level of ``verbosity`` (:func:`level_of`).

    Calling it again replaces the handler it added before (no duplicate lines); other handlers
    and other loggers are left alone.
    """
    level = level_of(verbosity)
    for name in names:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(h)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` (dest ``verbosity``, for :func:`configure_logging`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=QUIET,
        default=NORMAL,
        help="print only warnings and errors on stderr (no progress messages)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=VERBOSE,
        default=NORMAL,
        help="also log progress details (timings, loading)",
    )


@contextlib.contextmanager
def quieted(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Inside the block, logger ``name`` passes only records at ``level`` or above."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(old)


__all__ = [
    "NORMAL",
    "QUIET",
    "VERBOSE",
    "add_logging_arguments",
    "configure_logging",
    "level_of",
    "quieted",
]
