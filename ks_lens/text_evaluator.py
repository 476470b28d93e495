"""A text-level behaviour evaluator (tones, concepts, ...), independent of the steered model.

:class:`TextEvaluator` scores any text for each label (e.g. the six tones, or the six concepts) with
a linear model on surface features, so steered generations can be judged without asking the model
that produced them. Pipeline (scikit-learn):

1. word TF-IDF (uni- and bigrams) and ``char_wb`` TF-IDF (2-5 character n-grams inside word
   boundaries), sublinear TF, L2-normalised rows;
2. optionally the twelve :mod:`ks_lens.style` meters, standardised (``StandardScaler``);
3. the blocks stacked side by side and one L2-regularised logistic regression per label
   (``OneVsRestClassifier(LogisticRegression)`` on multi-hot targets), so every label gets an
   independent probability: a text can be both casual and concise, or neither.

Saved evaluators are :mod:`ks_lens.io` artefacts and hold no pickle: ``tensors.safetensors``
(IDF weights, scaler mean/scale, coefficients ``[K, D]`` and intercepts ``[K]``, float64, and each
vectorizer's terms in column order as UTF-8 JSON bytes) and ``meta.json`` (format, labels, config,
training-data hash, versions, validity metrics, the tensor file's SHA-256 and a ``meta_sha256``
over all of it). Loading rebuilds the vectorizers from the vocabularies and computes
``sigmoid(X @ coef.T + intercept)`` itself. Evaluators saved by ks-lens 0.1 (with a
``vocabulary.json``) still load (:mod:`ks_lens.text_evaluator_v1`).

:func:`validate_text_evaluator` measures how well the recipe generalises: question-grouped
K-fold cross-validation (no question's texts on both sides) and leave-one-writer-out (texts by a
writer never seen in training). :func:`default_text_evaluator` trains on a family's shipped gold
texts (tones or concepts) once and caches the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import expit
from threadpoolctl import threadpool_limits

from ks_lens.errors import (
    ConfigError,
    DatasetError,
    LabelError,
    MetadataMismatchError,
    StoreError,
    WrongTypeError,
)
from ks_lens.gold_texts import LabelledText, load_gold_texts, texts_hash
from ks_lens.io import (
    check_artifact_target,
    load_artifact,
    save_artifact,
    write_directory,
)
from ks_lens.style import STYLE_METER_NAMES, STYLE_VERSION, style_matrix
from ks_lens.utils import check_seed

#: the artefact kind (:mod:`ks_lens.io`): ``meta.json`` says ``"format": "ks_lens.text_evaluator"``
KIND = "text_evaluator"
FORMAT = f"ks_lens.{KIND}"
CACHE_SUBDIR = "text_evaluators"
#: a text with more than this many times the words of the longest training text is "far longer"
LONG_TEXT_FACTOR = 2


class LongTextWarning(UserWarning):
    """Texts far longer than any the evaluator was trained on: its scores on them are
    extrapolations (long texts pile up n-gram evidence, so they tend towards 0 or 1)."""


def n_words(text: str) -> int:
    """Words in ``text`` (white-space separated), the unit of the evaluator's length checks."""
    return len(text.split())


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TextEvaluatorConfig:
    """Hyper-parameters of :class:`TextEvaluator` (defaults chosen by grouped CV on gold texts).

    Attributes:
        word_ngram_range: ``(min_n, max_n)`` of the word TF-IDF n-grams.
        char_ngram_range: ``(min_n, max_n)`` of the ``char_wb`` TF-IDF n-grams.
        min_df: drop n-grams seen in fewer training texts than this.
        sublinear_tf: use ``1 + log(tf)`` instead of raw counts.
        max_features: keep at most this many n-grams per vectorizer (most frequent first);
            ``None`` keeps all.
        C: inverse L2-regularisation strength of each per-label logistic regression.
        use_style: append the standardised :mod:`ks_lens.style` meters to the features.
        style_weight: factor on the standardised style meters (their scale relative to the
            L2-normalised TF-IDF blocks).
        class_weight: ``"balanced"`` (re-weight positives and negatives per label) or ``None``.
        prefix_words: also train on the first ``prefix_words`` words of every longer
            single-label training text, with its label (``None``: off; :func:`prefix_views`). Generated answers are often cut at a
            token limit; without these views a cut-off answer reads as "short" and so as
            concise. Held-out validity is always measured on the complete texts.
        max_iter: L-BFGS iteration limit.
        seed: ``random_state`` of the solver (L-BFGS is deterministic; recorded for provenance).
    """

    word_ngram_range: tuple[int, int] = (1, 2)
    char_ngram_range: tuple[int, int] = (2, 5)
    min_df: int = 2
    sublinear_tf: bool = True
    max_features: int | None = 50_000
    C: float = 16.0
    use_style: bool = True
    style_weight: float = 0.05
    class_weight: str | None = "balanced"
    prefix_words: int | None = 24
    max_iter: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("word_ngram_range", "char_ngram_range"):
            lo, hi = getattr(self, name)
            if not (1 <= int(lo) <= int(hi)):
                raise ConfigError(f"{name} must be (min_n, max_n) with 1 <= min_n <= max_n")
            object.__setattr__(self, name, (int(lo), int(hi)))
        if self.min_df < 1:
            raise ConfigError("min_df must be >= 1")
        if self.max_features is not None and self.max_features < 1:
            raise ConfigError("max_features must be positive or None")
        if not (self.C > 0 and math.isfinite(self.C)):
            raise ConfigError(f"C must be a positive number, got {self.C}")
        if not (self.style_weight >= 0 and math.isfinite(self.style_weight)):
            raise ConfigError(f"style_weight must be >= 0, got {self.style_weight}")
        check_seed(self.seed)
        if self.class_weight not in ("balanced", None):
            raise ConfigError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        if self.max_iter < 1:
            raise ConfigError("max_iter must be positive")
        if self.prefix_words is not None and self.prefix_words < 1:
            raise ConfigError("prefix_words must be positive or None")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["word_ngram_range"] = list(self.word_ngram_range)
        d["char_ngram_range"] = list(self.char_ngram_range)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextEvaluatorConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown text-evaluator config fields {sorted(unknown)}")
        kw = dict(d)
        for name in ("word_ngram_range", "char_ngram_range"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def config_hash(self) -> str:
        """SHA-256 of the config (part of the default evaluator's cache key)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def prefix_views(texts: Sequence[LabelledText], n_words: int) -> list[LabelledText]:
    """The first ``n_words`` words of every single-label text longer than that, with its label
    (ids get a ``#prefix`` suffix): training views that look like answers cut at a token limit.

    Multi-label texts are left out: the first words of a two-tone text need not show both tones
    (measured: including them costs about 4 points of two-tone top-2 on complete texts).
    """
    out = []
    for t in texts:
        words = t.text.split()
        if len(t.labels) == 1 and len(words) > n_words:
            out.append(replace(t, id=f"{t.id}#prefix", text=" ".join(words[:n_words])))
    return out


def _vectorizer(
    analyzer: str, cfg: TextEvaluatorConfig, vocabulary: Sequence[str] | None = None
) -> Any:
    """A ``TfidfVectorizer`` (``analyzer`` ``"word"`` or ``"char_wb"``) with the config's settings;
    with ``vocabulary`` its columns are fixed (as when loading a saved evaluator)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        analyzer=analyzer,
        ngram_range=cfg.word_ngram_range if analyzer == "word" else cfg.char_ngram_range,
        lowercase=True,
        min_df=cfg.min_df,
        max_features=cfg.max_features,
        sublinear_tf=cfg.sublinear_tf,
        use_idf=True,
        smooth_idf=True,
        norm="l2",
        dtype=np.float64,
        vocabulary=None if vocabulary is None else list(vocabulary),
    )


def _terms(vectorizer: Any) -> list[str]:
    """The vectorizer's terms in column order."""
    terms = [""] * len(vectorizer.vocabulary_)
    for term, i in vectorizer.vocabulary_.items():
        terms[i] = term
    return terms


def _check_texts_arg(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise WrongTypeError(
            "texts must be a sequence of strings, not one string; wrap it in a list"
        )
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise WrongTypeError(f"texts[{i}] is {type(t).__name__}, not a string")
    return out


# ----------------------------------------------------------------------------- the evaluator


class TextEvaluator:
    """Per-label tone probabilities of texts from TF-IDF n-grams (+ style meters).

    Build one with :meth:`fit` (or :func:`default_text_evaluator`, or :meth:`load`); score texts
    with :meth:`predict_proba`.

    Attributes:
        label_names: the labels, in column order of :meth:`predict_proba`.
        config: the :class:`TextEvaluatorConfig` it was trained with.
        training_hash: :func:`ks_lens.gold_texts.texts_hash` of its training texts.
        n_training_texts: how many texts it was trained on.
        training_max_words: words in its longest training text (``None`` for evaluators saved
            before this was recorded); :meth:`predict_proba` warns on texts far longer.
        validity: held-out metrics (:class:`TextEvaluatorValidity`) when computed, else None.
        estimator: the fitted scikit-learn ``OneVsRestClassifier`` (only after :meth:`fit`;
            ``None`` after :meth:`load`).
    """

    def __init__(
        self,
        label_names: Sequence[str],
        config: TextEvaluatorConfig,
        word_vectorizer: Any,
        char_vectorizer: Any,
        style_mean: np.ndarray | None,
        style_scale: np.ndarray | None,
        coef: np.ndarray,
        intercept: np.ndarray,
        *,
        training_hash: str,
        n_training_texts: int,
        training_max_words: int | None = None,
        validity: TextEvaluatorValidity | None = None,
        estimator: Any | None = None,
    ) -> None:
        self.label_names: tuple[str, ...] = tuple(label_names)
        self.config = config
        self.word_vectorizer = word_vectorizer
        self.char_vectorizer = char_vectorizer
        self.style_mean = style_mean
        self.style_scale = style_scale
        self.coef = np.ascontiguousarray(coef, dtype=np.float64)
        self.intercept = np.ascontiguousarray(intercept, dtype=np.float64)
        self.training_hash = training_hash
        self.n_training_texts = int(n_training_texts)
        self.training_max_words = None if training_max_words is None else int(training_max_words)
        self.validity = validity
        self.estimator = estimator
        k, d = self.coef.shape
        if k != len(self.label_names) or self.intercept.shape != (k,):
            raise StoreError(
                f"text evaluator has {len(self.label_names)} labels but coefficients of shape "
                f"{self.coef.shape} and intercepts of shape {self.intercept.shape}"
            )
        if d != self.n_features:
            raise StoreError(
                f"text evaluator coefficients have {d} columns but the features have "
                f"{self.n_features}"
            )

    # -- features / prediction

    @property
    def n_features(self) -> int:
        """Number of feature columns ``D`` (word n-grams + char n-grams + style meters)."""
        n = len(self.word_vectorizer.vocabulary_) + len(self.char_vectorizer.vocabulary_)
        return n + (len(STYLE_METER_NAMES) if self.config.use_style else 0)

    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        """The feature matrix of ``texts``.

        Args:
            texts: ``n`` strings.

        Returns:
            CSR float64 matrix ``[n, D]``: word TF-IDF | char TF-IDF | standardised style meters
            (times ``config.style_weight``).
        """
        texts = _check_texts_arg(texts)
        if not texts:
            return sp.csr_matrix((0, self.n_features), dtype=np.float64)
        blocks = [self.word_vectorizer.transform(texts), self.char_vectorizer.transform(texts)]
        if self.config.use_style:
            assert self.style_mean is not None and self.style_scale is not None
            s = style_matrix(texts)
            s -= self.style_mean
            s /= self.style_scale
            if self.config.style_weight != 1.0:
                s *= self.config.style_weight
            blocks.append(sp.csr_matrix(s))
        return sp.hstack(blocks, format="csr", dtype=np.float64)

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """Per-label logits ``X @ coef.T + intercept``, float64 ``[n, K]``."""
        x = self.features(texts)
        return np.asarray(x @ self.coef.T) + self.intercept

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Independent per-label probabilities (sigmoids, not normalised across labels).

        Args:
            texts: ``n`` strings.

        Returns:
            float64 array ``[n, K]``; column ``k`` is the probability of ``label_names[k]``.

        Warns:
            LongTextWarning: some texts have more than :data:`LONG_TEXT_FACTOR` times the words
                of the longest training text (:meth:`long_texts`); they are scored all the same.
        """
        texts = _check_texts_arg(texts)
        long = self.long_texts(texts)
        if long:
            warnings.warn(self.long_text_message(texts, long), LongTextWarning, stacklevel=2)
        return expit(self.decision_function(texts))

    def long_texts(self, texts: Sequence[str]) -> list[int]:
        """Positions of the texts far longer than any training text: more than
        :data:`LONG_TEXT_FACTOR` times the words of the longest one (none when that length was
        not recorded). The evaluator never saw such texts; their scores are not reliable.

        Warned about rather than scored in windows: a windowed mean would be a different
        measure (the tone of the parts, not of the text), and would hide that the text is out
        of range; split such texts yourself if their parts are what you want scored."""
        if self.training_max_words is None:
            return []
        limit = LONG_TEXT_FACTOR * self.training_max_words
        return [i for i, t in enumerate(_check_texts_arg(texts)) if n_words(t) > limit]

    def long_text_message(
        self, texts: Sequence[str], long: Sequence[int], names: Sequence[str] | None = None
    ) -> str:
        """The warning for the texts at positions ``long`` (named by ``names``, else by their
        1-based position)."""
        which = [names[i] if names is not None else f"text {i + 1}" for i in long]
        shown = ", ".join(which[:5]) + (f" and {len(which) - 5} more" if len(which) > 5 else "")
        most = max(n_words(texts[i]) for i in long)
        return (
            f"{len(long)} of {len(texts)} texts ({shown}) have up to {most} words, more than "
            f"{LONG_TEXT_FACTOR} times the longest training text of this evaluator "
            f"({self.training_max_words} words); their scores are extrapolations and tend "
            "towards 0 or 1: score shorter parts instead"
        )

    def __repr__(self) -> str:
        return (
            f"TextEvaluator(labels={list(self.label_names)}, features={self.n_features}, "
            f"trained_on={self.n_training_texts} texts)"
        )

    # -- training

    @classmethod
    def fit(
        cls,
        texts: Sequence[LabelledText],
        label_names: Sequence[str],
        config: TextEvaluatorConfig | None = None,
    ) -> TextEvaluator:
        """Train on labelled texts.

        Args:
            texts: the training texts; every label must be in ``label_names``.
            label_names: the ``K`` labels, in the column order of the predictions.
            config: hyper-parameters (default :class:`TextEvaluatorConfig()`).

        Raises:
            LabelError: an unknown label, or repeated / empty label names.
            DatasetError: no texts, a label that no text (or every text) has, or no n-gram
                frequent enough to survive ``min_df``.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.preprocessing import MultiLabelBinarizer, StandardScaler

        cfg = config or TextEvaluatorConfig()
        names = tuple(label_names)
        if not names or len(set(names)) != len(names) or not all(names):
            raise LabelError(f"label names must be distinct and non-empty, got {list(names)}")
        texts = tuple(texts)
        if not texts:
            raise DatasetError("no texts to train the text evaluator on")
        for t in texts:
            bad = [x for x in t.labels if x not in names]
            if bad:
                raise LabelError(
                    f"text {t.id!r} has unknown label {bad[0]!r}; labels are {list(names)}"
                )
        train = list(texts)
        if cfg.prefix_words is not None:
            train += prefix_views(texts, cfg.prefix_words)
        y = MultiLabelBinarizer(classes=list(names)).fit_transform([t.labels for t in train])
        counts = y.sum(axis=0)
        for name, c in zip(names, counts, strict=True):
            if c == 0 or c == len(train):
                raise DatasetError(
                    f"label {name!r} is on {int(c)} of {len(train)} training texts; every label "
                    "needs positive and negative examples"
                )
        raw = [t.text for t in train]
        word = _vectorizer("word", cfg)
        char = _vectorizer("char_wb", cfg)
        try:
            xw = word.fit_transform(raw)
            xc = char.fit_transform(raw)
        except ValueError as e:  # e.g. "After pruning, no terms remain"
            raise DatasetError(f"cannot build the text evaluator's vocabulary: {e}") from e
        blocks = [xw, xc]
        mean = scale = None
        if cfg.use_style:
            meters = style_matrix(raw)
            scaler = StandardScaler().fit(meters)
            mean = np.asarray(scaler.mean_, dtype=np.float64)
            scale = np.asarray(scaler.scale_, dtype=np.float64)
            s = scaler.transform(meters)
            if cfg.style_weight != 1.0:
                s *= cfg.style_weight
            blocks.append(sp.csr_matrix(s))
        x = sp.hstack(blocks, format="csr", dtype=np.float64)
        clf = OneVsRestClassifier(
            LogisticRegression(
                C=cfg.C,
                class_weight=cfg.class_weight,
                max_iter=cfg.max_iter,
                random_state=cfg.seed,
                solver="lbfgs",
            )
        )
        with threadpool_limits(limits=1):  # small problem: threads only contend (and vary)
            clf.fit(x, y)
        coef = np.vstack([np.asarray(e.coef_, dtype=np.float64)[0] for e in clf.estimators_])
        intercept = np.array([float(e.intercept_[0]) for e in clf.estimators_])
        return cls(
            names,
            cfg,
            word,
            char,
            mean,
            scale,
            coef,
            intercept,
            training_hash=texts_hash(texts),
            n_training_texts=len(texts),
            training_max_words=max(n_words(t.text) for t in texts),
            estimator=clf,
        )

    # -- persistence

    def _meta(self) -> dict[str, Any]:
        """What ``meta.json`` records besides :mod:`ks_lens.io`'s own fields."""
        return {
            "label_names": list(self.label_names),
            "config": self.config.to_json(),
            "style_meters": list(STYLE_METER_NAMES),
            "style_version": STYLE_VERSION,
            "n_features": {
                "word": len(self.word_vectorizer.vocabulary_),
                "char": len(self.char_vectorizer.vocabulary_),
                "style": len(STYLE_METER_NAMES) if self.config.use_style else 0,
            },
            "training": {
                "texts_hash": self.training_hash,
                "n_texts": self.n_training_texts,
                **(
                    {}
                    if self.training_max_words is None
                    else {"max_words": self.training_max_words}
                ),
            },
            "validity": None if self.validity is None else self.validity.to_json(),
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        """IDF weights, scaler, coefficients (float64) and each vectorizer's terms in column
        order (``{word,char}_vocabulary``: the UTF-8 bytes of a JSON list, ``uint8``)."""
        arrays: dict[str, np.ndarray] = {
            "word_idf": np.asarray(self.word_vectorizer.idf_, dtype=np.float64),
            "char_idf": np.asarray(self.char_vectorizer.idf_, dtype=np.float64),
            "coef": self.coef,
            "intercept": self.intercept,
        }
        if self.config.use_style:
            assert self.style_mean is not None and self.style_scale is not None
            arrays["style_mean"] = self.style_mean
            arrays["style_scale"] = self.style_scale
        out = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in arrays.items()}
        for name, vec in (("word", self.word_vectorizer), ("char", self.char_vectorizer)):
            text = json.dumps(_terms(vec), ensure_ascii=False).encode("utf-8")
            out[f"{name}_vocabulary"] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        return out

    def save(self, directory: str | Path) -> Path:
        """Save as a :mod:`ks_lens.io` artefact (``tensors.safetensors`` + ``meta.json``, kind
        ``text_evaluator``), as a whole: the files are written to a sibling temporary directory
        that then takes its place (:func:`ks_lens.io.write_directory`), so a failed save (a full
        disk) leaves what was there untouched and never a mix of old and new files.

        Returns:
            The directory.

        Raises:
            StoreError: ``directory`` is a file, or holds something other than a text
                evaluator (a probe, an activation store, other files); an evaluator there is
                replaced.
            OSError: the file system refused; the error names ``directory``.
        """
        directory = Path(directory)
        check_artifact_target(directory, KIND)
        tensors, meta = self._tensors(), self._meta()
        return write_directory(directory, lambda d: save_artifact(d, tensors, meta, kind=KIND))

    @classmethod
    def load(cls, directory: str | Path, labels: Sequence[str] | None = None) -> TextEvaluator:
        """Load an evaluator saved by :meth:`save` (or by ks-lens 0.1, whose layout
        :mod:`ks_lens.text_evaluator_v1` reads), verifying its checksums.

        Args:
            directory: the evaluator directory.
            labels: when given, the label names (and order) the caller expects.

        Raises:
            StoreError: missing files, a format that is not a text evaluator (or a newer
                version), or any checksum mismatch (a modified or truncated file).
            MetadataMismatchError: ``labels`` differ from the evaluator's labels, or its style
                meters were defined differently from this ks-lens version's.
        """
        from ks_lens.text_evaluator_v1 import is_v1, read_v1

        directory = Path(directory)
        if is_v1(directory):
            arrays, meta, vocab = read_v1(directory, FORMAT)
        else:
            tensors, meta = load_artifact(directory, kind=KIND)
            try:
                vocab = {n: _decode_terms(tensors.pop(f"{n}_vocabulary")) for n in ("word", "char")}
            except (KeyError, ValueError) as e:
                raise StoreError(f"text evaluator at {directory} is incomplete ({e!r})") from e
            arrays = {k: v.numpy() for k, v in tensors.items()}
        return cls._from_saved(directory, arrays, meta, vocab, labels)

    @classmethod
    def _from_saved(
        cls,
        directory: Path,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        vocab: Mapping[str, list[str]],
        labels: Sequence[str] | None,
    ) -> TextEvaluator:
        """The evaluator from its checked files' contents (either layout)."""
        try:
            names = tuple(meta["label_names"])
            cfg = TextEvaluatorConfig.from_json(meta["config"])
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise StoreError(f"text evaluator at {directory} is inconsistent ({e!r})") from e
        if labels is not None and tuple(labels) != names:
            same = set(labels) == set(names)
            raise MetadataMismatchError(
                f"the text evaluator at {directory} was trained for labels {list(names)}, but "
                f"{list(labels)} were requested"
                + (" (same labels, different order)" if same else "")
            )
        if cfg.use_style and (
            meta.get("style_meters") != list(STYLE_METER_NAMES)
            or meta.get("style_version") != STYLE_VERSION
        ):
            raise MetadataMismatchError(
                f"the text evaluator at {directory} was trained with style meters "
                f"v{meta.get('style_version')} {meta.get('style_meters')}; this ks-lens computes "
                f"v{STYLE_VERSION} {list(STYLE_METER_NAMES)}. Re-train it."
            )
        try:
            word = _vectorizer("word", cfg, vocab["word"])
            char = _vectorizer("char_wb", cfg, vocab["char"])
            word.idf_ = arrays["word_idf"]
            char.idf_ = arrays["char_idf"]
            ev = cls(
                names,
                cfg,
                word,
                char,
                arrays.get("style_mean"),
                arrays.get("style_scale"),
                arrays["coef"],
                arrays["intercept"],
                training_hash=str(meta["training"]["texts_hash"]),
                n_training_texts=int(meta["training"]["n_texts"]),
                training_max_words=_optional_int(meta["training"].get("max_words")),
                validity=(
                    None
                    if meta.get("validity") is None
                    else TextEvaluatorValidity.from_json(meta["validity"])
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"text evaluator at {directory} is inconsistent ({e!r})") from e
        if cfg.use_style and (ev.style_mean is None or ev.style_scale is None):
            raise StoreError(f"text evaluator at {directory} lacks its style scaler")
        return ev


def _decode_terms(tensor: torch.Tensor) -> list[str]:
    """A vectorizer's terms from their saved form (the UTF-8 bytes of a JSON list)."""
    terms = json.loads(tensor.numpy().tobytes().decode("utf-8"))
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise ValueError("a vocabulary must be a list of strings")
    return terms


def _optional_int(value: Any) -> int | None:
    """A recorded count that older files lack: ``None``, else a non-negative integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _canonical(obj: Any) -> Any:
    """JSON round trip with non-finite floats as ``null`` (how records are stored)."""

    def strict(o: Any) -> Any:
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: strict(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [strict(v) for v in o]
        return o

    return json.loads(json.dumps(strict(obj), allow_nan=False))


# ----------------------------------------------------------------------------- validity


@dataclass(frozen=True)
class HeldOutScores:
    """Metrics of out-of-fold predictions (every text scored by a model that never saw it).

    Attributes:
        scheme: ``"question"`` (folds grouped by question) or ``"writer"`` (leave one source out).
        n_folds: number of folds.
        n_texts: texts scored.
        n_single: single-label texts.
        single_accuracy: share of single-label texts whose top-scored label is their label.
        single_recall: that share per label.
        per_label_auc: ROC AUC of each label's probability over all texts (NaN if undefined).
        mean_auc: mean of the per-label AUCs.
        n_two / two_tone_top2: two-label texts, and the share whose two labels are the top 2.
        n_three / three_tone_top3: the same for three-label texts (top 3).
        by_group_single_accuracy: single-label accuracy per held-out group (writer scheme only).
    """

    scheme: str
    n_folds: int
    n_texts: int
    n_single: int
    single_accuracy: float
    single_recall: dict[str, float]
    per_label_auc: dict[str, float]
    mean_auc: float
    n_two: int
    two_tone_top2: float | None
    n_three: int
    three_tone_top3: float | None
    by_group_single_accuracy: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return _canonical(asdict(self))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HeldOutScores:
        def num(v: Any) -> float:
            return float("nan") if v is None else float(v)

        return cls(
            scheme=str(d["scheme"]),
            n_folds=int(d["n_folds"]),
            n_texts=int(d["n_texts"]),
            n_single=int(d["n_single"]),
            single_accuracy=num(d["single_accuracy"]),
            single_recall={k: num(v) for k, v in d["single_recall"].items()},
            per_label_auc={k: num(v) for k, v in d["per_label_auc"].items()},
            mean_auc=num(d["mean_auc"]),
            n_two=int(d["n_two"]),
            two_tone_top2=None if d["two_tone_top2"] is None else float(d["two_tone_top2"]),
            n_three=int(d["n_three"]),
            three_tone_top3=None if d["three_tone_top3"] is None else float(d["three_tone_top3"]),
            by_group_single_accuracy=(
                None
                if d.get("by_group_single_accuracy") is None
                else {k: num(v) for k, v in d["by_group_single_accuracy"].items()}
            ),
        )


@dataclass(frozen=True)
class TextEvaluatorValidity:
    """Held-out validity of a text-evaluator recipe on a set of labelled texts.

    Attributes:
        label_names: the labels.
        config: the evaluator config (as JSON).
        texts_hash: hash of the texts it was measured on; n_texts: their number.
        question_cv: question-grouped K-fold scores.
        writer_cv: leave-one-writer-out scores (None when the texts have fewer than two
            distinct ``source`` values, or some have none).
    """

    label_names: tuple[str, ...]
    config: dict[str, Any]
    texts_hash: str
    n_texts: int
    question_cv: HeldOutScores
    writer_cv: HeldOutScores | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "label_names": list(self.label_names),
            "config": dict(self.config),
            "texts_hash": self.texts_hash,
            "n_texts": self.n_texts,
            "question_cv": self.question_cv.to_json(),
            "writer_cv": None if self.writer_cv is None else self.writer_cv.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextEvaluatorValidity:
        return cls(
            label_names=tuple(d["label_names"]),
            config=dict(d["config"]),
            texts_hash=str(d["texts_hash"]),
            n_texts=int(d["n_texts"]),
            question_cv=HeldOutScores.from_json(d["question_cv"]),
            writer_cv=None
            if d.get("writer_cv") is None
            else HeldOutScores.from_json(d["writer_cv"]),
        )

    def summary(self) -> str:
        """A small text table of the metrics."""
        rows = [("question-grouped CV", self.question_cv)]
        if self.writer_cv is not None:
            rows.append(("leave-one-writer-out", self.writer_cv))

        def pct(v: float | None) -> str:
            return "  n/a" if v is None or not math.isfinite(v) else f"{100 * v:5.1f}"

        lines = [
            f"held-out validity on {self.n_texts} texts (labels: {', '.join(self.label_names)})",
            f"{'scheme':<22} {'folds':>5} {'single acc':>10} {'mean AUC':>8} "
            f"{'2-tone top2':>11} {'3-tone top3':>11}",
        ]
        for name, s in rows:
            lines.append(
                f"{name:<22} {s.n_folds:5d} {pct(s.single_accuracy):>10} "
                f"{s.mean_auc:8.3f} {pct(s.two_tone_top2):>11} {pct(s.three_tone_top3):>11}"
            )
        for name, s in rows:
            auc = "  ".join(f"{k}={v:.3f}" for k, v in s.per_label_auc.items())
            rec = "  ".join(f"{k}={100 * v:.0f}" for k, v in s.single_recall.items())
            lines.append(f"{name}: per-label AUC  {auc}")
            lines.append(f"{name}: single-tone recall %  {rec}")
            if s.by_group_single_accuracy:
                grp = "  ".join(f"{k}={100 * v:.1f}" for k, v in s.by_group_single_accuracy.items())
                lines.append(f"{name}: single acc % by held-out group  {grp}")
        return "\n".join(lines)


def held_out_scores(
    y: np.ndarray,
    probs: np.ndarray,
    label_names: Sequence[str],
    *,
    scheme: str,
    n_folds: int,
    groups: Sequence[str] | None = None,
) -> HeldOutScores:
    """Score out-of-fold probabilities.

    Args:
        y: multi-hot true labels ``[n, K]`` (0/1).
        probs: predicted probabilities ``[n, K]``.
        label_names: the ``K`` labels.
        scheme: recorded as given (``"question"`` or ``"writer"``).
        n_folds: recorded as given.
        groups: optional held-out group of each text (per-group single accuracy is reported).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_true = y.sum(axis=1)
    order = np.argsort(-probs, axis=1, kind="stable")

    def topk_rate(k: int) -> tuple[int, float | None]:
        rows = np.flatnonzero(n_true == k)
        if rows.size == 0:
            return 0, None
        hits = [set(order[i, :k].tolist()) == set(np.flatnonzero(y[i]).tolist()) for i in rows]
        return int(rows.size), float(np.mean(hits))

    single = np.flatnonzero(n_true == 1)
    correct = (order[single, 0] == y[single].argmax(axis=1)) if single.size else np.zeros(0, bool)
    recall: dict[str, float] = {}
    for k, name in enumerate(label_names):
        mask = y[single, k] == 1
        recall[name] = float(correct[mask].mean()) if mask.any() else float("nan")
    auc: dict[str, float] = {}
    for k, name in enumerate(label_names):
        if 0 < y[:, k].sum() < len(y):
            auc[name] = float(roc_auc_score(y[:, k], probs[:, k]))
        else:
            auc[name] = float("nan")
    finite = [v for v in auc.values() if math.isfinite(v)]
    by_group: dict[str, float] | None = None
    if groups is not None:
        g = np.asarray(list(groups), dtype=object)[single]
        by_group = {str(k): float(correct[g == k].mean()) for k in sorted(set(g.tolist()))}
    n_two, two = topk_rate(2)
    n_three, three = topk_rate(3)
    return HeldOutScores(
        scheme=scheme,
        n_folds=n_folds,
        n_texts=len(y),
        n_single=int(single.size),
        single_accuracy=float(correct.mean()) if single.size else float("nan"),
        single_recall=recall,
        per_label_auc=auc,
        mean_auc=float(np.mean(finite)) if finite else float("nan"),
        n_two=n_two,
        two_tone_top2=two,
        n_three=n_three,
        three_tone_top3=three,
        by_group_single_accuracy=by_group,
    )


def cross_val_proba(
    texts: Sequence[LabelledText],
    label_names: Sequence[str],
    config: TextEvaluatorConfig | None,
    groups: Sequence[str],
    n_folds: int,
) -> np.ndarray:
    """Out-of-fold probabilities ``[n, K]`` from ``GroupKFold(n_folds)`` over ``groups``."""
    from sklearn.model_selection import GroupKFold

    texts = tuple(texts)
    probs = np.full((len(texts), len(label_names)), np.nan)
    for train_idx, test_idx in GroupKFold(n_splits=n_folds).split(texts, groups=list(groups)):
        ev = TextEvaluator.fit([texts[i] for i in train_idx], label_names, config)
        probs[test_idx] = ev.predict_proba([texts[i].text for i in test_idx])
    return probs


def validate_text_evaluator(
    texts: Sequence[LabelledText],
    label_names: Sequence[str],
    config: TextEvaluatorConfig | None = None,
    n_folds: int = 5,
) -> TextEvaluatorValidity:
    """Held-out validity of the evaluator recipe on labelled texts.

    Two schemes, both scoring every text with a model that did not train on it:

    * **question**: ``GroupKFold(n_folds)`` grouped by ``question_id`` (a text without one is its
      own group), so no question has texts on both sides;
    * **writer**: leave-one-writer-out, ``GroupKFold`` grouped by ``source`` with one fold per
      source: texts by a writer never seen in training (skipped unless every text has a source
      and there are at least two).

    Metrics per scheme (:class:`HeldOutScores`): single-label accuracy (argmax), per-label ROC
    AUC over all texts, and for two- and three-label texts the share whose true labels are
    exactly the top 2 / top 3.

    Args:
        texts: labelled texts (labels within ``label_names``).
        label_names: the ``K`` labels.
        config: the evaluator config (default :class:`TextEvaluatorConfig()`).
        n_folds: folds of the question scheme (capped at the number of questions).

    Raises:
        DatasetError: fewer than two question groups.
    """
    from sklearn.preprocessing import MultiLabelBinarizer

    cfg = config or TextEvaluatorConfig()
    texts = tuple(texts)
    names = tuple(label_names)
    y = MultiLabelBinarizer(classes=list(names)).fit_transform([t.labels for t in texts])
    qgroups = [t.question_id or f"text:{t.id}" for t in texts]
    k = min(n_folds, len(set(qgroups)))
    if k < 2:
        raise DatasetError("validation needs texts of at least two questions")
    qprobs = cross_val_proba(texts, names, cfg, qgroups, k)
    question_cv = held_out_scores(y, qprobs, names, scheme="question", n_folds=k)
    writer_cv = None
    sources = [t.source for t in texts]
    if all(s is not None for s in sources) and len(set(sources)) >= 2:
        wgroups = [str(s) for s in sources]
        nw = len(set(wgroups))
        wprobs = cross_val_proba(texts, names, cfg, wgroups, nw)
        writer_cv = held_out_scores(y, wprobs, names, scheme="writer", n_folds=nw, groups=wgroups)
    return TextEvaluatorValidity(
        label_names=names,
        config=cfg.to_json(),
        texts_hash=texts_hash(texts),
        n_texts=len(texts),
        question_cv=question_cv,
        writer_cv=writer_cv,
    )


# ----------------------------------------------------------------------------- default


def default_text_evaluator(
    cache_dir: str | Path | None = None,
    config: TextEvaluatorConfig | None = None,
    texts: Sequence[LabelledText] | None = None,
    family: str = "tones",
) -> TextEvaluator:
    """The evaluator trained on a family's gold texts (with validity), cached on disk.

    ``family`` is a shipped family (``"tones"``, ``"concepts"``) or a behaviours JSON file with a
    ``"gold_texts"`` field (:func:`ks_lens.gold_texts.load_gold_texts`); its labels are the
    evaluator's. ``texts`` trains it on a subset of those gold texts instead (e.g. the evaluator
    half of :func:`ks_lens.gold_texts.split_by_question`); the cache key is the texts' hash.

    The cache folder is ``{cache_dir}/gold-{hash}-cfg-{hash}-sklearn-{version}`` (default
    ``cache_dir``: ``$KS_LENS_CACHE/text_evaluators``, see :func:`ks_lens.packaged_models.cache_root`),
    so new gold texts, another config or another scikit-learn build a new one. A cached
    evaluator that fails to load (corrupt, modified, incomplete) is rebuilt with a warning.

    Args:
        cache_dir: where to cache (default under the ks-lens cache root).
        config: the evaluator config (default :class:`TextEvaluatorConfig()`).
        texts: the texts to train on (default: all of the family's gold texts).
        family: whose labels (and default texts).
    """
    import sklearn

    from ks_lens.datasets import load_dataset
    from ks_lens.packaged_models import cache_root

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
