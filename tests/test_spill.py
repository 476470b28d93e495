"""SpillList: tensors parked in a temporary file come back bitwise equal, freed slots are
reused, and the text level keeps its waiting log-probs there instead of in memory."""

from __future__ import annotations

import os

import pytest
import torch

import ks_lens.evaluation.scoring as scoring
from ks_lens.errors import ConfigError
from ks_lens.spill import SpillList


@pytest.mark.parametrize(
    "value",
    [
        torch.randn(3, 7, generator=torch.Generator().manual_seed(0)),
        torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16),
        torch.arange(12).reshape(3, 4),
        torch.tensor([True, False, True]),
        torch.tensor(3.25),  # 0-dim
        torch.empty(0, 4),  # no elements
    ],
)
def test_values_come_back_bitwise_equal(value):
    with SpillList(2) as items:
        items[1] = value
        back = items[1]
        assert back is not None and back.dtype == value.dtype and back.shape == value.shape
        assert torch.equal(
            back.view(-1).view(torch.uint8) if back.numel() else back,
            value.reshape(-1).view(torch.uint8) if value.numel() else value,
        )
        assert items[0] is None


def test_a_non_contiguous_tensor_is_stored_by_value():
    base = torch.arange(20.0).reshape(4, 5)
    with SpillList(1) as items:
        items[0] = base.t()  # a transposed view
        base.zero_()  # later changes to the source do not reach the stored copy
        assert torch.equal(items[0], torch.arange(20.0).reshape(4, 5).t())


def test_freed_slots_are_reused_so_the_file_grows_with_what_is_held():
    row = torch.ones(33, 100)
    with SpillList(10) as items:
        items[0], items[1] = row, row * 2
        assert items.file_bytes == 2 * row.numel() * 4
        for i in range(2, 10):  # hold at most two at a time
            items[i - 2] = None
            items[i] = row * i
        assert items.file_bytes == 2 * row.numel() * 4
        assert torch.equal(items[9], row * 9) and torch.equal(items[8], row * 8)
        assert [x is None for x in items] == [True] * 8 + [False, False]
        items[9] = torch.zeros(2)  # overwriting frees the old slot; a smaller item fits in it
        assert items.file_bytes == 2 * row.numel() * 4
        assert torch.equal(items[9], torch.zeros(2))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="length >= 0"):
        SpillList(-1)
    with SpillList(1) as items:
        with pytest.raises(ConfigError, match="holds tensors, got list"):
            items[0] = [1.0, 2.0]  # type: ignore[assignment]
        with pytest.raises(IndexError):
            items[1] = torch.zeros(1)


def test_the_file_is_closed_on_exit():
    with SpillList(1) as items:
        items[0] = torch.zeros(3)
        fd = items._fd
        os.fstat(fd)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_generation_keeps_waiting_log_probs_in_the_spill_file(tiny_model, tiny_probe, monkeypatch):
    """Every steered answer's log-probs go through the spill list (none is held as a tensor by
    the scorer), at most a question's answers plus one batch wait at once, and all are freed."""
    lists: list[SpillList] = []
    held: list[int] = []

    class Watched(SpillList):
        def __init__(self, n: int) -> None:
            super().__init__(n)
            lists.append(self)

        def __setitem__(self, i, value):
            super().__setitem__(i, value)
            held.append(sum(w is not None for w in self._where))

    monkeypatch.setattr(scoring, "SpillList", Watched)
    questions = ["Hi?", "Why is the sky blue today?", "How do I boil an egg, please?"]
    rows = [(0, i) for i in range(3)] + [(0, 2), (0, 1), (0, 0)]
    out = scoring.generate_and_score_rows(
        tiny_model,
        questions,
        [None],
        rows,
        response_probe=tiny_probe,
        max_new_tokens=4,
        batch_size=2,
    )
    assert len(lists) == 1 and len(lists[0]) == len(rows)
    assert all(w is None for w in lists[0]._where)  # every row scored and freed
    assert max(held) <= 2 + 2  # two answers of one question + one batch of 2
    assert held[-1] == 0
    assert all(k >= 1 for k in out.kl_steps)
    with pytest.raises(ValueError):  # the file was closed when the call returned
        lists[0]._file.fileno()
