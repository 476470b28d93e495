"""Shared fixtures: a tiny random-weight Llama (built in-process) and a small behaviour dataset."""

from __future__ import annotations

import os

import pytest
import torch
from jaxtyping import install_import_hook

# Runtime checks of the jaxtyping shape/dtype annotations (as TransformerLens's tests do): every
# function and dataclass in ks_lens is wrapped when the package is first imported, so this must
# run before anything imports ks_lens. tests/_shapecheck.py checks only the array annotations
# (with beartype); ks-lens's own checks of the other arguments raise its own errors, which the
# tests expect. KS_LENS_TYPECHECK=0 switches it off.
if os.environ.get("KS_LENS_TYPECHECK", "1") != "0":
    install_import_hook("ks_lens", "_shapecheck.shapecheck")

import ks_lens as ks
from ks_lens.activations import collect_activations
from ks_lens.datasets import Behaviour, BehaviourDataset, Question, load_dataset

# each pytest-xdist worker gets its share of the cores (scripts/test.sh runs 2 workers)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="run tests marked slow (also: KS_LENS_RUN_SLOW=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (large downloads, minutes) run only when asked for."""
    if config.getoption("--run-slow") or os.environ.get("KS_LENS_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or KS_LENS_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    return ks.load_model("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_dataset() -> BehaviourDataset:
    behaviours = (
        Behaviour("alpha", "Answer like a pirate, with many arrs and nautical words."),
        Behaviour("beta", "Be brief."),
        Behaviour(
            "gamma", "Answer with great care, explaining every risk in detail before anything else."
        ),
    )
    questions = tuple(
        Question(f"q{i:02d}", text, cat)
        for i, (text, cat) in enumerate(
            [
                ("How do I boil an egg?", "food"),
                ("What is the tallest mountain?", "facts"),
                ("Why is the sky blue?", "science"),
                ("How can I learn to juggle three balls?", "hobby"),
                ("What should I pack for a beach trip?", "travel"),
                ("How do plants make food from sunlight?", "science"),
                ("What is a good way to start running?", "hobby"),
                ("Which spices go well with lentils?", "food"),
                ("How long does it take light to reach Earth from the Sun?", "facts"),
                ("What are tips for a long train journey?", "travel"),
                ("How do I keep basil alive indoors?", "food"),
                ("What causes ocean tides?", "science"),
            ]
        )
    )
    return BehaviourDataset("tiny", behaviours, questions)


@pytest.fixture(scope="session")
def tiny_acts(tiny_model, tiny_dataset):
    return collect_activations(tiny_model, tiny_dataset, progress=False)


@pytest.fixture(scope="session")
def tiny_probe(tiny_acts):
    from ks_lens.probes import ProbeConfig, train_probe

    return train_probe(tiny_acts, 2, config=ProbeConfig(epochs=10, hidden=32, val_fraction=0.25))


@pytest.fixture(scope="session")
def tiny_tone_acts(tiny_model):
    """The tiny model's activations (every layer) on 4 training questions x 6 tones."""
    train = load_dataset("tones").split("train").head(4)
    return collect_activations(tiny_model, train, progress=False)


@pytest.fixture(scope="session")
def tiny_tone_probe(tiny_tone_acts):
    """A small MLP probe at blocks.2.hook_resid_post on :func:`tiny_tone_acts`."""
    from ks_lens.probes import ProbeConfig, train_probe

    return train_probe(tiny_tone_acts, 2, config=ProbeConfig(epochs=10, hidden=32))


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct); converted once into the ks-lens cache."""
    return ks.load_model("default")
