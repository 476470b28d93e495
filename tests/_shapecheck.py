"""The typechecker behind the test suite's jaxtyping import hook (see ``conftest.py``).

It checks only the jaxtyping array annotations (``Float[torch.Tensor, "n d_model"]`` and
containers of them: shapes, dtypes, the named dimensions agreeing across arguments) with
beartype. Every other annotation (``float``, ``Literal[...]``, ``Sequence[str]``) is left
unchecked here: ks-lens validates those itself and raises its own errors (``ConfigError``,
``WrongTypeError``) for callers from untyped code, and the tests check those errors.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jaxtyping
from beartype import beartype
from jaxtyping import AbstractArray


def _has_array(ann: Any) -> bool:
    if isinstance(ann, type) and issubclass(ann, AbstractArray):
        return True
    return any(_has_array(a) for a in typing.get_args(ann) if a is not Ellipsis)


def shapecheck(fn: Any) -> Any:
    """``beartype(fn)`` checking only the annotations that contain a jaxtyping array type."""
    anns = getattr(fn, "__annotations__", None)
    if not anns:
        return fn
    # jaxtyping hands over a generated function whose annotations are already resolved
    kept = {k: v for k, v in anns.items() if not isinstance(v, str) and _has_array(v)}
    if not kept:
        return fn
    fn.__annotations__ = kept
    return beartype(fn)


@contextmanager
def shapes_unchecked() -> Iterator[None]:
    """Switch the runtime shape checks off in a ``with`` block: for tests of ks-lens's own errors
    on wrongly shaped input (which the checks would otherwise report first)."""
    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)
