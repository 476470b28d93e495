"""The ``>>>`` examples in the public API's docstrings run, on the tiny model, and pass.

Each public object's examples run with the same globals: ``ks`` (the package), ``torch``,
``model`` (``ks.load_model("tiny-random-llama")``), ``acts`` (its activations on four training
questions of the tone dataset, every layer), ``probe`` (a probe at layer 2) and ``tmp`` (a
scratch directory).
"""

from __future__ import annotations

import doctest
import inspect
import types
from typing import Any

import pytest
import torch

import ks_lens as ks
from ks_lens.evaluation import style
from ks_lens.steering import SteeringMethod

#: objects whose docstrings must carry a runnable example
MUST_HAVE_EXAMPLES = (
    "load_model",
    "load_dataset",
    "collect_activations",
    "train_probes",
    "KSteering",
    "CAA",
    "SteeringVectors",
    "generate",
    "calibrate_alpha",
    "ControlVector",
    "control_vector",
    "export_gguf",
)


def _public_objects() -> dict[str, Any]:
    """ks-lens's own functions and classes exported at the top level, plus a few more."""
    out: dict[str, Any] = {}
    for name in ks.__all__:
        obj = getattr(ks, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith(
            "ks_lens"
        ):
            out[name] = obj
    out["SteeringMethod"] = SteeringMethod  # steer() / hooks() examples live on the base class
    out["style"] = style
    return out


OBJECTS = _public_objects()


def _doctests(name: str, obj: Any, globs: dict[str, Any]) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(
        recurse=inspect.isclass(obj) or isinstance(obj, types.ModuleType)
    )
    module = inspect.getmodule(obj)
    if isinstance(obj, types.ModuleType):  # a module's examples use its own names
        globs = {**vars(obj), **globs}
    return [t for t in finder.find(obj, name, module=module, globs=globs) if t.examples]


@pytest.fixture(scope="module")
def doc_globs(tiny_model, tiny_tone_acts, tiny_tone_probe, tmp_path_factory) -> dict[str, Any]:
    return {
        "ks": ks,
        "ks_lens": ks,
        "torch": torch,
        "model": tiny_model,
        "acts": tiny_tone_acts,
        "probe": tiny_tone_probe,
        "tmp": tmp_path_factory.mktemp("doctests"),
    }


def test_main_objects_have_examples():
    for name in MUST_HAVE_EXAMPLES:
        found = _doctests(name, OBJECTS[name], {})
        assert found, f"ks.{name} has no >>> example"


@pytest.mark.parametrize("name", sorted(n for n, o in OBJECTS.items() if _doctests(n, o, {})))
def test_docstring_examples_run(name, doc_globs):
    tests = _doctests(name, OBJECTS[name], doc_globs)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    results = [runner.run(t, out=report.append) for t in tests]
    assert sum(r.failed for r in results) == 0, "".join(report)
    assert sum(r.attempted for r in results) > 0
