"""Exceptions raised by ks-lens.

Every error ks-lens raises on bad input derives from :class:`KsLensError`, so notebook users can
catch one class; each subclass also derives from the builtin it refines (``ValueError``,
``KeyError``, ...), so generic handlers keep working.
"""

from __future__ import annotations


class KsLensError(Exception):
    """Base class of all ks-lens errors."""


class ConfigError(KsLensError, ValueError):
    """An argument or option has a bad value, or options that do not go together (the message
    names the argument and what to do)."""


class WrongTypeError(ConfigError, TypeError):
    """An argument has the wrong type (one string where a list of strings is expected, an object
    that is not a ks-lens probe or steerer, ...); also a ``TypeError`` for generic handlers."""


class RenamedError(ConfigError, TypeError):
    """A keyword argument, field or command-line option that ks-lens 0.2.0 renamed was given
    under its old name (the message names the new one; the old name is refused, not ignored)."""


class MissingKeyError(KsLensError, KeyError):
    """A ks-lens mapping has no such key (a probe set without that layer, a batch field that does
    not exist); also a ``KeyError``, so mapping code keeps working."""

    def __str__(self) -> str:
        # KeyError quotes its message (repr); show it as written, like the other errors
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ModelLoadError(KsLensError, RuntimeError):
    """A model could not be found, fetched or loaded."""


class UnknownModelError(ModelLoadError, ValueError):
    """The model name is neither a named model, a local path, nor loadable from the HF hub."""


class HookPointError(KsLensError, ValueError):
    """A hook name or layer index does not exist on the model, or cannot be written to."""


class DatasetError(KsLensError, ValueError):
    """A dataset or question file is malformed (the message names the file and line)."""


class StoreError(KsLensError, RuntimeError):
    """An on-disk artefact (activation store, probe, vector) is missing, corrupt or incomplete."""


class MetadataMismatchError(KsLensError, ValueError):
    """An artefact was made for another model, hook point, layer or label set."""


class LabelError(KsLensError, ValueError):
    """Unknown label names, or a label requested both as target and avoid."""


class ContextLengthError(KsLensError, ValueError):
    """A prompt (plus the tokens to generate) does not fit in the model's context window."""


class TrainingError(KsLensError, RuntimeError):
    """Training diverged (a loss became NaN or infinite); nothing is saved."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command, with a sentence on what was saved (``saved``); the command line
    prints it. A ``KeyboardInterrupt``, not a :class:`KsLensError`: nothing was wrong."""

    def __init__(self, saved: str) -> None:
        super().__init__(saved)
        self.saved = saved


class MissingDependencyError(KsLensError, ImportError):
    """An optional package that a feature needs is not installed (the message says how to)."""


class VersionError(KsLensError, RuntimeError):
    """The installed package versions are known to give wrong results for the requested operation
    (the message names the versions and what to use instead)."""


class VersionMismatchWarning(UserWarning):
    """An artefact was saved under a different major version of a package that determines its
    numbers (the warning names both versions)."""


class VersionWarning(UserWarning):
    """The installed package versions are known to give wrong results in some TransformerLens
    paths that ks-lens does not use by default (the warning names them)."""
