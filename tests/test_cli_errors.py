"""The command line on bad input and faults: one line on stderr, a meaningful exit code, and a
traceback only for genuine bugs."""

from __future__ import annotations

import pytest
import torch

from ks_lens import activations as A
from ks_lens import cli
from ks_lens.activations import ActivationStore
from ks_lens.activations import collect as collect_module
from ks_lens.cli import main
from ks_lens.errors import DatasetError
from ks_lens.io import artifact_format
from ks_lens.probes import load_probe_any


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


# ----------------------------------------------------------------------------- real commands

TINY = ["--model", "tiny-random-llama"]


def _collect(out, *extra: str) -> int:
    return main(["collect", *TINY, "--max-questions", "4", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "acts"
    assert _collect(out, "--layers", "1,2") == 0
    return out


@pytest.fixture(scope="module")
def artefacts(store, tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    assert (
        main(
            ["train", "--acts", str(store), "--layer", "2", "--epochs", "2", "--out", str(d / "p")]
        )
        == 0
    )
    assert main(["vectors", "--acts", str(store), "--layer", "2", "--out", str(d / "v")]) == 0
    return d


def test_rerun_repairs_a_store_with_a_deleted_shard(tmp_path, capsys):
    # the reproduction: this used to fail on every rerun ("delete it and rerun")
    args = ["--split", "train", "--shard-rows", "8"]
    assert _collect(tmp_path / "s", *args) == 0
    assert _collect(tmp_path / "ref", *args) == 0
    (tmp_path / "s" / "shards" / "shard-00001.safetensors").unlink()
    with pytest.warns(UserWarning, match="re-collecting 1 damaged shard"):
        assert _collect(tmp_path / "s", *args) == 0
    repaired = ActivationStore(tmp_path / "s").load()
    assert torch.equal(
        repaired.acts["resid_post"], ActivationStore(tmp_path / "ref").load().acts["resid_post"]
    )


def test_train_never_hides_or_overwrites_probes_silently(store, tmp_path, capsys):
    out = str(tmp_path / "P")
    train = ["train", "--acts", str(store), "--epochs", "1", "--out", out]
    assert main([*train, "--layer", "all"]) == 0
    capsys.readouterr()
    # a single probe would have been hidden by the probe set's index
    assert main([*train, "--layer", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a probe set; pass --overwrite to replace it" in err
    assert artifact_format(tmp_path / "P") == "ks_lens.probe_set"
    assert main([*train, "--layer", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "P").iterdir()) == [
        "meta.json",
        "tensors.safetensors",
    ]
    assert load_probe_any(out).layer == 2
    # and an existing single probe is not overwritten silently either
    assert main([*train, "--layer", "1"]) == 2
    assert "already holds a probe; pass --overwrite" in capsys.readouterr().err
    assert load_probe_any(out).layer == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert main([*train[:-1], str(tmp_path / "notes"), "--overwrite"]) == 2
    assert (
        "not hold a probe or probe set; choose a new or empty directory" in capsys.readouterr().err
    )
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_vectors_output_is_not_overwritten_silently(store, artefacts, capsys):
    vec = ["vectors", "--acts", str(store), "--layer", "1", "--out", str(artefacts / "v")]
    assert main(vec) == 2
    assert "already holds steering vectors; pass --overwrite" in capsys.readouterr().err
    assert (
        main(["vectors", "--acts", str(store), "--layer", "1", "--out", str(artefacts / "p")]) == 2
    )
    assert "holds a probe, not steering vectors" in capsys.readouterr().err


@pytest.mark.parametrize("lr", ["inf", "nan", "-1"])
def test_train_refuses_non_finite_learning_rate(store, tmp_path, capsys, lr):
    assert main(["train", "--acts", str(store), "--lr", lr, "--out", str(tmp_path / "p")]) == 2
    assert "lr must be a positive finite number" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_train_logistic_probe(store, tmp_path, capsys):
    import json

    out = tmp_path / "p"
    argv = ["train", "--acts", str(store), "--layer", "2", "--architecture", "logistic", "--C", "0.5"]
    assert main([*argv, "--val-split", "stratified_group", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["config"]["architecture"] == "logistic" and meta["config"]["val_split"] == "stratified_group"
    )
    assert (
        meta["metrics"]["fit"]["C"] == 0.5 and meta["metrics"]["fit"]["library"] == "scikit-learn"
    )
    assert "val acc" in capsys.readouterr().out
    for bad, message in (
        (["--C", "0"], "C must be a positive finite number"),
        (["--max-iter", "0"], "max_iter must be an integer >= 1"),
    ):
        assert main([*argv, *bad, "--out", str(tmp_path / "q")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "q").exists()
    # the solver's choices come from ProbeConfig's Literal: refused while parsing (exit 2)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--solver", "liblinear", "--out", str(tmp_path / "q")])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "invalid choice 'liblinear'" in err and "'lbfgs'" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["collect", *TINY, "--layers", "abc", "--out", "x"],
        ["train", "--acts", "a", "--layer", "abc", "--out", "x"],
        ["train", "--acts", "a", "--layer", ",", "--out", "x"],
    ],
)
def test_bad_layer_lists_name_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    # the options parser (tyro) frames its message and wraps it at the terminal width
    err = " ".join(capsys.readouterr().err.replace("\u2502", " ").split())
    flag = argv[argv.index("--layers" if "--layers" in argv else "--layer")]
    assert f"Error parsing {flag}: expected 'all' or comma-separated layer indices" in err
    assert "invalid literal" not in err and "Traceback" not in err


def test_out_that_is_a_file(store, artefacts, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for argv in (
        ["collect", *TINY, "--out", str(f)],
        ["train", "--acts", str(store), "--out", str(f)],
        ["vectors", "--acts", str(store), "--layer", "2", "--out", str(f)],
    ):
        assert main(argv) == 2
        assert (
            capsys.readouterr().err
            == f"ks-lens: error: --out {f} is an existing file; give a directory path\n"
        )
    assert main(["collect", *TINY, "--out", str(f / "sub")]) == 2
    assert f"--out {f / 'sub'}: {f} is a file, not a directory" in capsys.readouterr().err


def test_unwritable_out(store, tmp_path, capsys, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.common.tempfile, "TemporaryFile", denied)
    assert main(["train", "--acts", str(store), "--out", str(tmp_path / "ro" / "p")]) == 2
    err = capsys.readouterr().err
    assert (
        f"--out {tmp_path / 'ro' / 'p'}: cannot write in {tmp_path} (Permission denied); choose a writable directory"
        in err
    )


def test_steer_refuses_flags_that_do_not_apply(artefacts, capsys):
    steer = ["steer", *TINY, "--target", "casual", "--alpha", "1", "--max-new-tokens", "2", "Hi?"]
    assert (
        main([*steer, "--vectors", str(artefacts / "v"), "--steps", "3", "--objective", "softmin"])
        == 2
    )
    assert (
        "--objective, --steps apply to K-Steering (--classifier), not to --vectors"
        in capsys.readouterr().err
    )
    assert main([*steer, "--vectors", str(artefacts / "v"), "--layer", "1"]) == 2
    assert "--layer 1 does not apply: the vectors in" in capsys.readouterr().err
    assert main([*steer, "--classifier", str(artefacts / "p"), "--normalize"]) == 2
    assert "--normalize apply to CAA (--vectors), not to --classifier" in capsys.readouterr().err
    assert main([*steer, "--classifier", str(artefacts / "p"), "--layer", "1"]) == 2
    assert "is for layer 2, not 1" in capsys.readouterr().err
    assert (
        main([*steer, "--vectors", str(artefacts / "v"), "--layer", "2", "--caa-combine", "sum"])
        == 0
    )
    assert main([*steer, "--alpha", "-1", "--vectors", str(artefacts / "v")]) == 2
    assert "alpha must be >= 0" in capsys.readouterr().err
    assert main(steer) == 2
    both = [*steer, "--vectors", str(artefacts / "v"), "--classifier", str(artefacts / "p")]
    assert main(both) == 2
    assert capsys.readouterr().err.count("give exactly one of --classifier DIR") == 2


def test_ctrl_c_during_collect_says_what_was_saved_and_resumes(tmp_path, monkeypatch, capsys):
    real = collect_module._collect_chunk
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_collect_chunk", interrupted)
    args = ["--split", "train", "--shard-rows", "8"]
    assert _collect(tmp_path / "s", *args) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"ks-lens: interrupted; 8/24 rows are saved in {tmp_path / 's'}; "
        "rerun the same command to resume"
    )
    assert not any("Traceback" in line for line in err)
    monkeypatch.setattr(collect_module, "_collect_chunk", real)
    assert _collect(tmp_path / "s", *args) == 0
    assert ActivationStore(tmp_path / "s").complete


def test_ctrl_c_during_steer_is_one_line(artefacts, monkeypatch, capsys):
    import ks_lens.generation as G

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "generate", interrupted)
    argv = [
        "steer",
        *TINY,
        "--vectors",
        str(artefacts / "v"),
        "--target",
        "casual",
        "--alpha",
        "1",
        "Hi?",
    ]
    assert main(argv) == 130
    assert capsys.readouterr().err == (
        "ks-lens: interrupted; nothing was saved (steer writes no files); "
        "the model's hooks were removed\n"
    )


def test_collect_input_errors_are_one_line(tmp_path, capsys):
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "One?"}\n{"text": "Two?"}\n')
    assert (
        main(
            [
                "collect",
                *TINY,
                "--questions",
                str(two),
                "--split",
                "calibration",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "split 'calibration' of dataset 'tones' has no questions" in capsys.readouterr().err
    assert main(["collect", *TINY, "--questions", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path} is a directory; expected a question file" in capsys.readouterr().err
    assert main(["collect", *TINY, "--dataset", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is a directory; expected a behaviours file" in capsys.readouterr().err
    assert (
        main(
            [
                "collect",
                "--model",
                "tiny-random-llama",
                "--device",
                "garbage",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "unknown device 'garbage'; use cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    assert main(["collect", "--model", "", "--out", str(tmp_path / "o")]) == 2
    assert "model name must be a non-empty string" in capsys.readouterr().err


def test_collect_and_train_at_a_non_d_model_hook(tmp_path, capsys):
    out = tmp_path / "z"
    assert _collect(out, "--layers", "1", "--hooks", "attn.hook_z,resid_post") == 0
    store = ActivationStore(out)
    assert store.feature_shapes["attn.hook_z"] == [4, 16]
    probe_dir = tmp_path / "p"
    train = ["train", "--acts", str(out), "--epochs", "1", "--out", str(probe_dir)]
    assert main([*train, "--hook", "attn.hook_z"]) == 0
    assert load_probe_any(probe_dir).hook_name == "blocks.1.attn.hook_z"
    capsys.readouterr()
    assert main([*train, "--hook", "mlp.hook_post", "--overwrite"]) == 2
    assert "store has no 'mlp.hook_post' activations" in capsys.readouterr().err
    assert _collect(tmp_path / "bad", "--hooks", "attn.hook_pattern") == 2
    assert "no per-token activation" in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 22


def test_steer_zero_steps_or_decay_reach_the_method_checks(artefacts, capsys):
    # 0 == False: `--steps 0` used to count as "not given" and run with the defaults
    steer = ["steer", *TINY, "--target", "casual", "--alpha", "1", "--max-new-tokens", "2", "Hi?"]
    p, v = str(artefacts / "p"), str(artefacts / "v")
    for extra, message in [
        (["--classifier", p, "--steps", "0"], "steps must be a positive int, got 0"),
        (["--classifier", p, "--decay", "0"], r"decay must be in (0, 1], got 0.0"),
        (["--vectors", v, "--steps", "0"], "--steps apply to K-Steering (--classifier), not to"),
        (["--vectors", v, "--decay", "0"], "--decay apply to K-Steering (--classifier), not to"),
    ]:
        assert main([*steer, *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"ks-lens: error: {message}")
        assert captured.err.count("\n") == 1


def test_seed_out_of_range_is_refused_before_anything_is_written(store, tmp_path, capsys):
    huge = "99999999999999999999999"
    for mode in ("prompt", "response"):
        out = tmp_path / f"s-{mode}"
        assert _collect(out, "--mode", mode, "--max-new-tokens", "2", "--seed", huge) == 2
        assert capsys.readouterr().err == (
            f"ks-lens: error: --seed must be an integer from 0 to 4294967295, got {huge}\n"
        )
        assert not out.exists()  # used to leave an incomplete store behind
    out = tmp_path / "p"
    argv = ["train", "--acts", str(store), "--layer", "1", "--out", str(out), "--seed", huge]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"ks-lens: error: seed must be an integer from 0 to 4294967295, got {huge}\n"
    )
    assert not out.exists()
    # the library checks where the value enters, whatever the caller
    from ks_lens.errors import ConfigError
    from ks_lens.models import load_model

    with pytest.raises(ConfigError, match="seed must be an integer from 0 to 4294967295"):
        A.collect_to_store(
            load_model("tiny-random-llama"),
            _tones(1),
            tmp_path / "lib",
            seed=2**40,
        )
    assert not (tmp_path / "lib").exists()


def _tones(n: int):
    from ks_lens.datasets import load_dataset

    return load_dataset("tones").head(n)


def test_train_val_fraction_zero_is_refused(store, tmp_path, capsys):
    # it used to train without held-out rows and print training accuracy as "val acc"
    out = tmp_path / "p"
    argv = ["train", "--acts", str(store), "--layer", "1", "--out", str(out)]
    assert main([*argv, "--val-fraction", "0"]) == 2
    assert capsys.readouterr().err == "ks-lens: error: val_fraction must be in (0, 1), got 0.0\n"
    assert not out.exists()


def test_disk_full_during_collect_is_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    import ks_lens.io as kio

    real = kio.save_file
    calls = {"n": 0}

    def disk_full(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28) at "
                f'path "{path}"'
            )
        return real(tensors, path)

    monkeypatch.setattr(kio, "save_file", disk_full)
    out = tmp_path / "s"
    args = ["--split", "train", "--shard-rows", "8"]
    assert _collect(out, *args) == 1
    err = capsys.readouterr().err.splitlines()  # progress bars, then the error
    assert err[-1] == (
        f"ks-lens: error: {out / 'shards' / 'shard-00001.safetensors'}: No space left on device"
    )
    assert not any("Traceback" in line or "SafetensorError" in line for line in err)
    assert not list((out / "shards").glob(".*.tmp"))  # no half-written temporary left
    monkeypatch.setattr(kio, "save_file", real)
    assert _collect(out, *args) == 0
    assert ActivationStore(out).complete


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    # a full disk shows up as OSError(28) without a file name; the message must name the file
    import ks_lens.io as kio

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kio.os, "fsync", full)
    target = tmp_path / "meta.json"
    with pytest.raises(OSError) as e:
        kio.atomic_write_json(target, {"a": 1})
    assert (e.value.errno, e.value.filename) == (28, str(target))
    assert cli._describe_os_error(e.value) == f"{target}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_ctrl_c_during_demo_says_what_was_saved(tmp_path, monkeypatch, capsys):
    real = collect_module._collect_chunk
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first store is complete, the second just begun
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_collect_chunk", interrupted)
    out = tmp_path / "demo"
    assert main(["demo", *TINY, "--fast", "--out", str(out)]) == 130
    err = capsys.readouterr().err.splitlines()
    stores = sorted(p.parent for p in (out / "acts").glob("*/meta.json"))
    assert len(stores) == 2
    first, second = (ActivationStore(s) for s in stores)
    done = [first, second] if first.complete else [second, first]
    assert done[0].complete and not done[1].complete and done[1].n_rows_done == 0
    state = [
        "complete" if s.complete else f"{s.n_rows_done}/{s.meta['n_rows']} rows"
        for s in (first, second)
    ]
    listed = ", ".join(f"acts/{s.path.name} ({st})" for s, st in zip((first, second), state, strict=True))
    assert err[-1] == (
        f"ks-lens: interrupted; {out} holds 2 activation store(s): {listed}; rerun the same "
        "command to resume (complete stores are reused, an incomplete one continues where it "
        "stopped)"
    )
    assert not any("nothing was saved" in line for line in err)
    # nothing there yet: then nothing was saved
    from ks_lens.cli.demo import saved_summary

    assert saved_summary(tmp_path / "none") == "nothing was saved"
