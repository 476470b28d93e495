"""The evaluator: :class:`TextEvaluator` (fit, predict, save, load) and its feature helpers."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import expit
from threadpoolctl import threadpool_limits

from ks_lens.datasets.gold_texts import LabelledText, texts_hash
from ks_lens.errors import (
    ConfigError,
    DatasetError,
    LabelError,
    MetadataMismatchError,
    StoreError,
    WrongTypeError,
)
from ks_lens.evaluation.style import STYLE_METER_NAMES, STYLE_VERSION, style_matrix
from ks_lens.io import (
    check_artifact_target,
    load_artifact,
    save_artifact,
    write_directory,
)
from ks_lens.text_evaluator.config import (
    ARTEFACT,
    FORMAT,
    LONG_TEXT_FACTOR,
    LongTextWarning,
    TextEvaluatorConfig,
    n_words,
)
from ks_lens.text_evaluator.validity import TextEvaluatorValidity


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


def _checked_texts(
    texts: Sequence[LabelledText], names: tuple[str, ...]
) -> tuple[LabelledText, ...]:
    """``texts`` as a tuple; LabelError for repeated or empty label names or a text's unknown
    label, DatasetError for no texts."""
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
    return texts


def _label_matrix(train: Sequence[LabelledText], names: tuple[str, ...]) -> np.ndarray:
    """The multi-hot ``[n_texts, K]`` targets; DatasetError for a label no text (or every
    text) has."""
    from sklearn.preprocessing import MultiLabelBinarizer

    y = MultiLabelBinarizer(classes=list(names)).fit_transform([t.labels for t in train])
    counts = y.sum(axis=0)
    for name, c in zip(names, counts, strict=True):
        if c == 0 or c == len(train):
            raise DatasetError(
                f"label {name!r} is on {int(c)} of {len(train)} training texts; every label "
                "needs positive and negative examples"
            )
    return y


class _Features(NamedTuple):
    """The fitted feature extractors and the training texts' features."""

    word: Any  # TfidfVectorizer over words
    char: Any  # TfidfVectorizer over character n-grams
    mean: np.ndarray | None  # style meters' mean (None without use_style)
    scale: np.ndarray | None  # and scale
    x: sp.csr_matrix  # [n_texts, n_features]


def _fit_features(raw: list[str], cfg: TextEvaluatorConfig) -> _Features:
    """Fit the word and character TF-IDF vocabularies (and the style meters' scaling, with
    ``use_style``) on ``raw``; DatasetError when no n-gram survives ``min_df``."""
    from sklearn.preprocessing import StandardScaler

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
    return _Features(word, char, mean, scale, x)


def _fit_classifier(
    x: sp.csr_matrix, y: np.ndarray, cfg: TextEvaluatorConfig
) -> tuple[Any, np.ndarray, np.ndarray]:
    """One-vs-rest logistic regressions (single-threaded): the estimator, its coefficients
    ``[K, n_features]`` and intercepts ``[K]``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

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
    return clf, coef, intercept


class TextEvaluator:
    """Per-label tone probabilities of texts from TF-IDF n-grams (+ style meters).

    Build one with :meth:`fit` (or :func:`default_text_evaluator`, or :meth:`load`); score texts
    with :meth:`predict_proba`.

    Attributes:
        label_names: the labels, in column order of :meth:`predict_proba`.
        config: the :class:`TextEvaluatorConfig` it was trained with.
        training_hash: :func:`ks_lens.datasets.gold_texts.texts_hash` of its training texts.
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
        cfg = config or TextEvaluatorConfig()
        names = tuple(label_names)
        texts = _checked_texts(texts, names)
        train = list(texts)
        if cfg.prefix_words is not None:
            train += prefix_views(texts, cfg.prefix_words)
        y = _label_matrix(train, names)
        raw = [t.text for t in train]
        f = _fit_features(raw, cfg)
        clf, coef, intercept = _fit_classifier(f.x, y, cfg)
        return cls(
            names,
            cfg,
            f.word,
            f.char,
            f.mean,
            f.scale,
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
        """Save as a :mod:`ks_lens.io` artefact (``tensors.safetensors`` + ``meta.json``, artefact
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
        check_artifact_target(directory, ARTEFACT)
        tensors, meta = self._tensors(), self._meta()
        return write_directory(
            directory, lambda d: save_artifact(d, tensors, meta, artefact=ARTEFACT)
        )

    @classmethod
    def load(cls, directory: str | Path, labels: Sequence[str] | None = None) -> TextEvaluator:
        """Load an evaluator saved by :meth:`save` (or by ks-lens 0.1, whose layout
        :mod:`ks_lens.text_evaluator.v1` reads), verifying its checksums.

        Args:
            directory: the evaluator directory.
            labels: when given, the label names (and order) the caller expects.

        Raises:
            StoreError: missing files, a format that is not a text evaluator (or a newer
                version), or any checksum mismatch (a modified or truncated file).
            MetadataMismatchError: ``labels`` differ from the evaluator's labels, or its style
                meters were defined differently from this ks-lens version's.
        """
        from ks_lens.text_evaluator.v1 import is_v1, read_v1

        directory = Path(directory)
        if is_v1(directory):
            arrays, meta, vocab = read_v1(directory, FORMAT)
        else:
            tensors, meta = load_artifact(directory, artefact=ARTEFACT)
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
