"""``ks-lens report`` (re-render a comparison report), ``ks-lens evaluate-text`` (score texts
with a text evaluator) and ``ks-lens train-text-evaluator``."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import tyro

from ks_lens.cli.common import _check_out
from ks_lens.errors import LabelError


@dataclass(frozen=True)
class ReportOptions:
    """Re-render a comparison report (DIR/report.json) with this version's summaries."""

    dir: tyro.conf.Positional[str]  # a demo output directory holding report.json


def cmd_report(o: ReportOptions) -> int:
    from ks_lens.io import read_json
    from ks_lens.report import rerender, versions_line

    paths = rerender(o.dir, command=f"ks-lens report {o.dir}")
    print(f"re-rendered {paths['json']}, {paths['markdown']} and {len(paths) - 2} figures")
    print(versions_line(read_json(paths["json"], what="comparison report")))
    return 0


@dataclass(frozen=True)
class EvaluateTextOptions:
    """Score texts (JSONL with a 'text' field) for each label with a text-level evaluator."""

    texts: str  # JSONL file, one object with 'text' per line
    # evaluator directory (None: trained on the dataset's shipped gold texts, cached)
    evaluator: str | None = None
    # behaviour family of the default evaluator: tones, concepts, or a behaviours JSON file
    dataset: str = "tones"
    style: bool = False  # also print each text's style meters


def cmd_evaluate_text(o: EvaluateTextOptions) -> int:
    import json

    from ks_lens.datasets.gold_texts import load_texts
    from ks_lens.evaluation.style import style_meters
    from ks_lens.text_evaluator import LongTextWarning, TextEvaluator, default_text_evaluator

    rows = load_texts(o.texts)
    ev = (
        TextEvaluator.load(o.evaluator) if o.evaluator else default_text_evaluator(family=o.dataset)
    )
    texts = [text for _, text in rows]
    long = ev.long_texts(texts)
    if long:  # once, naming the texts by id (or position in the file), before any output
        names = [f"id {r}" if r is not None else f"text {i + 1}" for i, (r, _) in enumerate(rows)]
        warnings.warn(ev.long_text_message(texts, long, names), LongTextWarning, stacklevel=1)
    chunk = 256
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        with warnings.catch_warnings():  # said above: not again per chunk
            warnings.simplefilter("ignore", LongTextWarning)
            probs = ev.predict_proba([text for _, text in part])
        for (rid, text), p in zip(part, probs, strict=True):
            out: dict[str, object] = {} if rid is None else {"id": rid}
            out["probs"] = {n: round(float(v), 6) for n, v in zip(ev.label_names, p, strict=True)}
            if o.style:
                out["style"] = {k: round(v, 6) for k, v in style_meters(text).to_json().items()}
            print(json.dumps(out, ensure_ascii=False))
    return 0


@dataclass(frozen=True)
class TrainTextEvaluatorOptions:
    """Train a text-level evaluator on labelled texts and print its held-out validity."""

    out: str  # directory to save the evaluator in
    texts: str | None = None  # labelled-text JSONL (None: the dataset's shipped gold texts)
    # behaviour family whose labels (and gold texts, without --texts) are used: tones, concepts,
    # or a behaviours JSON file
    dataset: str = "tones"
    overwrite: bool = False  # replace the text evaluator already in --out
    labels: tuple[str, ...] = ()  # label names (none given: those in the texts)
    folds: int = 5  # question-grouped CV folds; 0 skips validation
    C: float | None = None  # inverse regularisation strength (None: TextEvaluatorConfig's)
    style: bool = True  # use the style meters (--no-style leaves them out)
    seed: int = 0


def cmd_train_text_evaluator(o: TrainTextEvaluatorOptions) -> int:
    import dataclasses

    from ks_lens.datasets import load_dataset
    from ks_lens.datasets.gold_texts import (
        check_label_options,
        load_gold_texts,
        load_labelled_texts,
    )
    from ks_lens.text_evaluator import TextEvaluator, TextEvaluatorConfig, validate_text_evaluator

    out = _check_out(
        o.out, holds=("ks_lens.text_evaluator",), what="a text evaluator", overwrite=o.overwrite
    )
    family = load_dataset(o.dataset).labels
    try:
        labels: list[str] | None = list(check_label_options(o.labels)) if o.labels else None
    except LabelError as e:
        raise LabelError(f"--labels: {e}") from None
    if o.texts:
        texts = load_labelled_texts(o.texts, labels)
        if labels is None:
            seen = list(dict.fromkeys(x for t in texts for x in t.labels))
            labels = [x for x in family if x in seen] if set(seen) <= set(family) else seen
    else:
        texts = load_gold_texts(o.dataset)
        labels = labels or list(family)
        if list(labels) != list(family):
            raise LabelError(f"the shipped gold texts have the labels {list(family)}")
    cfg = TextEvaluatorConfig(use_style=o.style, seed=o.seed)
    if o.C is not None:
        cfg = dataclasses.replace(cfg, C=o.C)
    t0 = time.perf_counter()
    ev = TextEvaluator.fit(texts, labels, cfg)
    print(f"trained on {len(texts)} texts in {time.perf_counter() - t0:.1f} s: {ev}")
    if o.folds > 0:
        t0 = time.perf_counter()
        ev.validity = validate_text_evaluator(texts, labels, cfg, n_folds=o.folds)
        print(ev.validity.summary())
        print(f"(validation took {time.perf_counter() - t0:.1f} s)")
    ev.save(out)  # as a whole: a failed save leaves --out as it was
    print(f"saved to {out}")
    return 0
