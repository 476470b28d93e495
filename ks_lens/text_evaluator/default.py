"""The evaluator trained on a family's gold texts, cached on disk (default_text_evaluator)."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from ks_lens.datasets.gold_texts import LabelledText, load_gold_texts, texts_hash
from ks_lens.errors import MetadataMismatchError, StoreError
from ks_lens.text_evaluator.config import CACHE_SUBDIR, TextEvaluatorConfig, n_words
from ks_lens.text_evaluator.crossval import validate_text_evaluator
from ks_lens.text_evaluator.model import TextEvaluator


def default_text_evaluator(
    cache_dir: str | Path | None = None,
    config: TextEvaluatorConfig | None = None,
    texts: Sequence[LabelledText] | None = None,
    family: str = "tones",
) -> TextEvaluator:
    """The evaluator trained on a family's gold texts (with validity), cached on disk.

    ``family`` is a shipped family (``"tones"``, ``"concepts"``) or a behaviours JSON file with a
    ``"gold_texts"`` field (:func:`ks_lens.datasets.gold_texts.load_gold_texts`); its labels are the
    evaluator's. ``texts`` trains it on a subset of those gold texts instead (e.g. the evaluator
    half of :func:`ks_lens.datasets.gold_texts.split_by_question`); the cache key is the texts'
    hash.

    The cache folder is ``{cache_dir}/gold-{hash}-cfg-{hash}-sklearn-{version}`` (default
    ``cache_dir``: ``$KS_LENS_CACHE/text_evaluators``, see
    :func:`ks_lens.models.packaged.cache_root`), so new gold texts, another config or another
    scikit-learn build a new one. A cached evaluator that fails to load (corrupt, modified,
    incomplete) is rebuilt with a warning.

    Args:
        cache_dir: where to cache (default under the ks-lens cache root).
        config: the evaluator config (default :class:`TextEvaluatorConfig()`).
        texts: the texts to train on (default: all of the family's gold texts).
        family: whose labels (and default texts).
    """
    import sklearn

    from ks_lens.datasets import load_dataset
    from ks_lens.models.packaged import cache_root

    cfg = config or TextEvaluatorConfig()
    gold = tuple(texts) if texts is not None else load_gold_texts(family)
    labels = load_dataset(family).labels
    gold_hash = texts_hash(gold)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / CACHE_SUBDIR
    target = (
        root / f"gold-{gold_hash[:12]}-cfg-{cfg.config_hash()[:12]}-sklearn-{sklearn.__version__}"
    )
    if target.exists():
        try:
            ev = TextEvaluator.load(target, labels=labels)
            if ev.training_hash != gold_hash or ev.config != cfg:
                raise StoreError("it was trained on other texts or with another config")
            if ev.training_max_words is None:  # cached before the length was recorded
                ev.training_max_words = max(n_words(t.text) for t in gold)
            return ev
        except (StoreError, MetadataMismatchError) as e:
            warnings.warn(
                f"the cached text evaluator in {target} is unusable ({e}); rebuilding it",
                stacklevel=2,
            )
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    ev = TextEvaluator.fit(gold, labels, cfg)
    ev.validity = validate_text_evaluator(gold, labels, cfg)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        ev.save(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished first: keep its copy when it loads
            TextEvaluator.load(target, labels=labels)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ev
