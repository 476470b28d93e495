"""The command line on bad input and faults: one line on stderr, a meaningful exit code, and a
traceback only for genuine bugs."""

from __future__ import annotations

import pytest

from ks_lens import cli
from ks_lens.cli import main
from ks_lens.errors import DatasetError


def _fail_with(monkeypatch, exc: BaseException) -> None:
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_models", boom)  # build_parser() binds it when main runs


def test_library_errors_are_one_line_with_exit_2(monkeypatch, capsys):
    _fail_with(monkeypatch, DatasetError("q.jsonl:3: empty question text"))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "ks-lens: error: q.jsonl:3: empty question text\n"


def test_os_errors_are_one_line_with_exit_1(monkeypatch, capsys):
    _fail_with(monkeypatch, PermissionError(13, "Permission denied", "runs/x/meta.json"))
    assert main(["models"]) == 1
    assert capsys.readouterr().err == "ks-lens: error: runs/x/meta.json: Permission denied\n"


def test_genuine_bugs_keep_their_traceback(monkeypatch):
    # a plain ValueError is a bug somewhere, not bad input: it must not be reported as one
    _fail_with(monkeypatch, ValueError("internal invariant broken"))
    with pytest.raises(ValueError, match="internal invariant broken"):
        main(["models"])
