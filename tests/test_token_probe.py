"""Per-token steering probes (issue 24, lever 1): one row per answer token of the gold texts, the
probe trained on them, the ``ksteer_token`` method and the pipeline's kit field."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import ks_lens as ks
from ks_lens._runtime.batching import record_activations
from ks_lens.activations import capture_tokens, collect_activations, collect_token_activations
from ks_lens.comparison import METHODS, ComparisonConfig, SteeringKit, run_comparison
from ks_lens.datasets import multi_hot
from ks_lens.datasets.gold_texts import LabelledText
from ks_lens.errors import ConfigError, DatasetError
from ks_lens.models.chat import ChatPrompt, encode_chat
from ks_lens.pipeline import PipelineConfig, needs_token_probe, prepare, texts_dataset
from ks_lens.probes import Probe, ProbeConfig, split_by_group, train_probe, train_token_probe
from ks_lens.steering import KSteering, SteeringVectors

LABELS = ("alpha", "beta", "gamma")
N = 5
QUESTIONS = [
    ("How do I boil an egg?", "food"),
    ("Why is the sky blue?", "science"),
    ("What should I pack for a trip?", "travel"),
    ("How can I learn to juggle?", "hobby"),
    ("What causes tides?", "science"),
    ("Which spices suit lentils?", "food"),
]
ANSWERS = {
    ("alpha",): "Arr, matey: the answer be on the horizon, arr!",
    ("beta",): "Ok",  # 2 tokens on the tiny tokenizer: fewer than N, every one a row
    ("gamma",): "Carefully: first consider every risk, then act slowly.",
    ("alpha", "gamma"): "Arr, carefully now, matey, mind each risk on deck.",
}


def _texts() -> list[LabelledText]:
    out = []
    for qi, (q, _) in enumerate(QUESTIONS):
        for li, (labs, text) in enumerate(ANSWERS.items()):
            body = text if len(text) < N else f"{text} ({qi})"
            out.append(LabelledText(f"q{qi}-t{li}", body, labs, f"q{qi}", q))
    return out


@pytest.fixture(scope="module")
def texts() -> list[LabelledText]:
    return _texts()


@pytest.fixture(scope="module")
def token_acts(tiny_model, texts):
    return collect_token_activations(
        tiny_model, texts_dataset(texts, LABELS), layer=2, max_tokens=N, batch_size=5
    )


@pytest.fixture(scope="module")
def token_probe(token_acts, texts):
    question = {t.id: t.question_id for t in texts}
    cfg = ProbeConfig(epochs=10, hidden=32, val_fraction=0.34)
    return train_token_probe(
        token_acts, config=cfg, groups=[question[i] for i in token_acts.question_ids]
    )


def _n_hooks(model) -> int:
    points = {id(h): h for h in model.hook_dict.values()}
    return sum(len(h._forward_hooks) for h in points.values())


def test_rows_are_the_first_n_answer_tokens_of_each_text(tiny_model, texts, token_acts):
    tok = tiny_model.tokenizer
    hook = "blocks.2.hook_resid_post"
    answers = [list(tok(t.text, add_special_tokens=False)["input_ids"]) for t in texts]
    counts = [min(N, len(a)) for a in answers]
    assert counts[1] == 2 and max(counts) == N  # a short answer gives all its tokens
    assert len(token_acts) == sum(counts) == token_acts.meta["n_rows"]
    rows = token_acts.meta["token_rows"]
    assert rows["text"] == [i for i, n in enumerate(counts) for _ in range(n)]
    assert rows["token"] == [j for n in counts for j in range(n)]
    assert token_acts.meta["collect"]["position"] == "tokens"
    assert token_acts.meta["collect"]["max_tokens"] == N
    x = token_acts.at(2)
    r = 0
    for t, a, n in zip(texts, answers, counts, strict=True):
        # the whole text run alone (not cut, not batched): its answer tokens, not the prompt's
        head = encode_chat(tok, ChatPrompt(t.question or "", None))
        with record_activations(tiny_model, [hook]) as rec:
            tiny_model(torch.tensor([head + a]))
        full = rec[hook][0].float()
        assert torch.allclose(x[r : r + n], full[len(head) : len(head) + n], atol=1e-5), t.id
        assert not torch.allclose(x[r], full[len(head) - 1], atol=1e-3)  # not the prompt's last
        r += n


def test_each_row_carries_its_texts_labels_and_id(texts, token_acts):
    y = token_acts.one_hot()
    rows = token_acts.meta["token_rows"]["text"]
    for i, (t_idx, qid) in enumerate(zip(rows, token_acts.question_ids, strict=True)):
        t = texts[t_idx]
        assert qid == t.id
        assert token_acts.label_names[int(token_acts.labels[i])] == "+".join(t.labels)
        expected = torch.tensor([float(lab in t.labels) for lab in LABELS])
        assert torch.equal(y[i], expected)
    assert y.sum(1).max() == 2  # the combined texts' rows are multi-hot
    assert torch.equal(y, multi_hot(token_acts.labels, token_acts.label_names))


def test_split_is_question_grouped_and_the_final_token_probes(texts, token_acts, token_probe):
    question = {t.id: t.question_id for t in texts}
    groups = [question[i] for i in token_acts.question_ids]
    tr, va = split_by_group(groups, 0.34, seed=0)
    q_tr = {groups[i] for i in tr.tolist()}
    q_va = {groups[i] for i in va.tolist()}
    assert q_va and q_tr and not q_tr & q_va  # no question on both sides
    # the same questions as the final-token probe's split of the same texts (one row per text)
    _, fva = split_by_group([t.question_id or "" for t in texts], 0.34, seed=0)
    assert q_va == {texts[i].question_id for i in fva.tolist()}
    assert token_probe.metrics["n_train"] == len(tr) and token_probe.metrics["n_val"] == len(va)


def test_token_probe_records_itself_and_round_trips(tiny_model, token_acts, token_probe, tmp_path):
    p = token_probe
    assert p.source["per_token"] is True and p.source["max_tokens"] == N
    assert p.source["position"] == "tokens" and p.source["n_texts"] == len(_texts())
    assert p.hook_name == "blocks.2.hook_resid_post" and p.label_names == LABELS
    assert len(p.linears) == 3  # the default probe's architecture (two hidden layers)
    assert p.mean.shape == p.std.shape == (tiny_model.cfg.d_model,)
    assert p.metrics["n_train"] + p.metrics["n_val"] == len(token_acts)
    p.save(tmp_path / "tok")
    q = Probe.load(tmp_path / "tok", model=tiny_model)
    for name, t in p.state_tensors().items():
        assert torch.equal(q.state_tensors()[name], t), name
    assert q.source == p.source and q.metrics == p.metrics and q.config == p.config
    x = token_acts.at(2)[:7]
    assert torch.equal(q(x), p(x))


def test_ksteer_token_is_the_precond_step_on_the_token_probe(tiny_model, token_probe, tiny_acts):
    vectors = SteeringVectors.fit(tiny_acts, 2)
    kit = SteeringKit(token_probe, vectors, token_probe=token_probe)
    method = METHODS["ksteer_token"].build(kit)
    hand = KSteering(token_probe, precondition="diag")
    assert isinstance(method, KSteering) and repr(method) == repr(hand)
    assert METHODS["ksteer_token"].alpha0 == METHODS["ksteer_precond"].alpha0
    x = torch.randn(4, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    # by hand: x + alpha * sigma^2 * grad of the target logit (one target, no avoid)
    xg = x.clone().requires_grad_(True)
    token_probe(xg)[:, 0].sum().backward()
    assert xg.grad is not None
    expected = x + 2.0 * token_probe.std**2 * xg.grad
    got = method.apply(x, target=["alpha"], alpha=2.0)
    assert torch.allclose(got, expected, atol=1e-5)
    # it steers the tiny model and leaves no hook behind
    batch = ks.tokenize_chat(tiny_model, ["hello?", "two prompts here?"])
    before = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    n0 = _n_hooks(tiny_model)
    with method.steer(tiny_model, target=["alpha", "gamma"], alpha=50.0):
        steered = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    assert _n_hooks(tiny_model) == n0
    assert not torch.allclose(steered, before, atol=1e-4)
    assert torch.equal(tiny_model(batch.input_ids, attention_mask=batch.attention_mask), before)


def test_ksteer_token_without_the_probe_is_a_config_error(tiny_probe, tiny_acts):
    kit = SteeringKit(tiny_probe, SteeringVectors.fit(tiny_acts, 2))
    with pytest.raises(ConfigError, match="ksteer_token method needs a per-token steering probe"):
        METHODS["ksteer_token"].build(kit)
    assert needs_token_probe(ComparisonConfig(methods=("caa_mean", "ksteer_token")))
    assert not needs_token_probe(ComparisonConfig())


def test_bad_input_is_refused(tiny_model, tiny_dataset, texts, tiny_acts):
    ds = texts_dataset(texts[:4], LABELS)
    with pytest.raises(ConfigError, match="max_tokens must be at least 1"):
        collect_token_activations(tiny_model, ds, layer=2, max_tokens=0)
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        collect_token_activations(tiny_model, ds, layer=2, batch_size=0)
    with pytest.raises(ks.HookPointError, match="out of range"):
        collect_token_activations(tiny_model, ds, layer=99)
    with pytest.raises(ConfigError, match="teacher-force a fixed answer"):
        collect_token_activations(tiny_model, tiny_dataset, layer=2)  # questions, no answers
    empty = [replace(t, text="") for t in texts[:2]]
    with pytest.raises(DatasetError, match="no answer tokens"):
        collect_token_activations(tiny_model, texts_dataset(empty, LABELS), layer=2)
    with pytest.raises(ConfigError, match="needs the per-token rows"):
        train_token_probe(tiny_acts.select(range(20)))
    with pytest.raises(ConfigError, match="token_probe_tokens"):
        PipelineConfig(token_probe_tokens=0).validate()


def test_capture_tokens_checks_positions_and_removes_hooks(tiny_model):
    batch = ks.tokenize_chat(tiny_model, ["hi?", "a longer prompt here?"])
    hook = "blocks.1.hook_resid_post"
    n0 = _n_hooks(tiny_model)
    pos = torch.tensor([[0, 1], [2, 3]])
    (got,) = capture_tokens(tiny_model, batch, [hook], pos)
    assert got.shape == (2, 2, tiny_model.cfg.d_model) and _n_hooks(tiny_model) == n0
    for b in range(2):  # each row run alone
        ids = batch.input_ids[b][batch.attention_mask[b].bool()][None]
        with record_activations(tiny_model, [hook]) as rec:
            tiny_model(ids)
        assert torch.allclose(got[b], rec[hook][0, pos[b]].float(), atol=1e-5)
    too_far = batch.lengths[0].item()
    with pytest.raises(ConfigError, match="index each row's real tokens"):
        capture_tokens(tiny_model, batch, [hook], torch.tensor([[too_far], [0]]))
    with pytest.raises(ConfigError, match="positions must be"):  # one row too few
        capture_tokens(tiny_model, batch, [hook], torch.tensor([[0]]))
    assert _n_hooks(tiny_model) == n0


def test_run_comparison_refuses_a_token_probe_at_another_hook(tiny_model, tiny_dataset, token_acts):
    acts = collect_activations(tiny_model, tiny_dataset, layers=[1, 3], progress=False)
    cfg = ProbeConfig(epochs=2, hidden=8)
    probe = train_probe(acts, 1, config=cfg)
    other = train_token_probe(token_acts, config=cfg)  # layer 2, other labels too
    with pytest.raises(ConfigError, match="the per-token probe reads blocks.2"):
        run_comparison(
            tiny_model,
            probe=probe,
            vectors=SteeringVectors.fit(acts, 1),
            evaluator=train_probe(acts, 3, config=cfg),
            text_evaluator=None,
            calib_questions=["q?"],
            test_questions=["q?"],
            config=ComparisonConfig(methods=("caa_mean", "ksteer_token"), instructed=False),
            token_probe=other,
        )


def test_prepare_trains_and_saves_the_token_probe_only_when_asked(tmp_path):
    cfg = PipelineConfig.fast(
        model="tiny-random-llama",
        n_gold=24,
        layer=2,
        multilayer_offsets=(-1, 0),
        n_evaluator=6,
        token_probe_tokens=4,
    )
    cfg = replace(cfg, comparison=replace(cfg.comparison, methods=("caa_mean", "ksteer_token")))
    s = prepare(cfg, tmp_path / "work", progress=False)
    tp = s.kit.token_probe
    assert tp is not None and tp.source["per_token"] and tp.source["max_tokens"] == 4
    assert tp.hook_name == s.probe.hook_name and tp.label_names == s.probe.label_names
    # rows: the first 4 answer tokens of each steering-half text (every gold text has more),
    # the texts the final-token probe learns one row each from
    n_texts = s.probe.metrics["n_train"] + s.probe.metrics["n_val"]
    assert tp.source["n_texts"] == n_texts
    assert tp.metrics["n_train"] + tp.metrics["n_val"] == 4 * n_texts
    saved = Probe.load(tmp_path / "work" / "probes" / "steering-text-token")
    assert torch.equal(saved.linears[0].weight, tp.linears[0].weight)
    assert saved.source == tp.source
    assert "token_probe_s" in s.timings


def test_the_levers_study_asks_prepare_for_the_token_probe(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "analysis"))
    import common
    import steering_levers

    o = common.parse(steering_levers.LeversOptions, "d", "o", ["--levers", "token_probe"])
    assert o.levers == ("token_probe",) and not needs_token_probe(o.config.comparison)
    w = steering_levers.with_methods(o, "ksteer_token")
    assert needs_token_probe(w.config.comparison)
    assert w.config.comparison.methods == (*o.config.comparison.methods, "ksteer_token")
    assert steering_levers.with_methods(w, "ksteer_token") is w  # already there: unchanged


def test_the_token_probe_is_reused_from_its_directory_only_for_the_same_inputs(
    tiny_model, texts, tmp_path, monkeypatch
):
    """token_steering_probe(directory=...) trains and saves once, reuses the saved probe for the
    same inputs (no collection), and collects again when an input changes or the file is bad."""
    import ks_lens.pipeline.kits as kits

    cfg = replace(PipelineConfig.fast(model="tiny-random-llama"), token_probe_tokens=3)
    groups = {t.id: t.question_id for t in texts}
    where = tmp_path / "token-cache"
    collected = []
    real = kits.collect_token_activations

    def counting(*args, **kwargs):
        collected.append(kwargs["max_tokens"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kits, "collect_token_activations", counting)

    def probe(cfg=cfg, groups=groups, texts=texts):
        return kits.token_steering_probe(
            tiny_model, texts, LABELS, 2, cfg, groups=groups, directory=where
        )

    first = probe()
    again = probe()
    assert collected == [3]
    assert torch.equal(again.linears[0].weight, first.linears[0].weight)
    assert again.source == first.source and again.source["cache_key"]["max_tokens"] == 3
    probe(cfg=replace(cfg, token_probe_tokens=4))  # another token count: collected again
    probe(groups={t.id: "one" for t in texts})  # another grouping
    probe(texts=texts[:-1])  # other texts
    assert collected == [3, 4, 3, 3]
    (where / "meta.json").write_text("{not json")  # a damaged cache is rebuilt, not trusted
    probe()
    assert collected == [3, 4, 3, 3, 3]
    assert Probe.load(where).source["cache_key"]["max_tokens"] == 3
