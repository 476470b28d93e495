"""Interpretable style meters: a dozen regex counts that describe *how* a text is written.

The meters are cheap, deterministic and independent of any model, so they can be read directly
("this answer has 4 hedges per 100 words") and fed to the text evaluator as extra features.
They are computed on the text alone (English; curly apostrophes are treated as straight ones).

Tokens:

* a **word** is a number with optional decimal or thousands separators (``2.5``, ``10,935``)
  or a run of letters/digits, optionally joined by apostrophes (``don't`` and ``it's`` are one
  word each; ``450°F`` is two: ``450`` and ``F``); matching is case-insensitive;
* a **sentence** is a stretch of text containing at least one letter and ended by ``.``, ``!``,
  ``?`` or ``…`` followed by white space or the end of the text, or the text's unterminated tail
  (so ``2.5`` does not end a sentence, and a bare list number ``1.`` is not one). A text with
  letters has at least one sentence; an empty text has none.

Meters (all ``float``; the rates are 0 for a text without words):

======================  ==========================================================================
``words``               number of words.
``sentences``           number of sentences.
``mean_word_length``    mean number of characters per word (apostrophes not counted).
``contractions``        contractions per 100 words: words ending in ``n't``, ``'re``, ``'ve``, ``'ll``,
                        ``'d``, ``'m``, or a pronoun/wh-word/``let`` + ``'s`` (``it's``, ``that's``,
                        ``let's``; not possessives such as ``John's``).
``exclamations``        runs of ``!`` per sentence.
``informal``            informal or slang words (:data:`INFORMAL_WORDS`) and phrases
                        (:data:`INFORMAL_PHRASES`) per 100 words.
``hedges``              hedging / caution words (:data:`HEDGE_WORDS`: may, might, could, perhaps, likely,
                        depends, risk, consult, careful, ...) and phrases (:data:`HEDGE_PHRASES`) per
                        100 words.
``second_person``       ``you``/``your``/``yours``/``yourself``/``yourselves`` and their contractions
                        (``you're``, ...) per 100 words.
``feeling``             feeling / emotion / support words (:data:`FEELING_WORDS`: feel, worried,
                        understandable, support, gentle, hope, ...) per 100 words.
``long_words``          share (0..1) of words with at least 9 letters.
``technical``           technical words per 100 words: words containing a digit, unit abbreviations
                        (:data:`UNIT_WORDS`), and words of at least 7 letters ending in a typical
                        technical suffix (:data:`TECHNICAL_SUFFIXES`: -ation, -ity, -ology, -ic, -ysis,
                        ..., also with a plural ``s``); a word counts once.
``list_steps``          list items and step markers: lines starting with a bullet (``-``, ``*``, ``•``)
                        or a number (``1.``, ``2)``, ``(3)``) then a space, inline enumerators
                        (``(1)``, ``2)`` between spaces), and the words first, firstly, second,
                        secondly, third, thirdly, then, next, finally, lastly, afterwards.
======================  ==========================================================================

Example::

    >>> m = style_meters("Honestly, it's fine! You could try it.")
    >>> (m.words, m.sentences, m.contractions, m.exclamations)
    (7.0, 2.0, 14.285714285714286, 0.5)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Bumped whenever a meter's definition or word list changes (recorded by saved evaluators).
STYLE_VERSION = 1

INFORMAL_WORDS: frozenset[str] = frozenset(
    """
    honestly kinda sorta gonna wanna gotta lemme dunno gimme yeah yep yup nope nah ngl tbh lol
    haha hah lmao omg btw imo fyi ok okay hey heya oh ooh wow whoa yay ugh meh hmm cool awesome
    super totally basically literally stuff guys folks dude bro chill legit vibe vibes fam
    bummer cuz cos lotta tons bunch freaking crazy hack hacks sweet jk nbd y'all ya gotcha
    ain't nifty comfy fave faves pics yummy tasty bucks kiddo pal buddy whatevs
    """.split()
)
INFORMAL_PHRASES: tuple[str, ...] = (
    "no biggie",
    "pretty much",
    "for sure",
    "a ton",
    "no worries",
    "piece of cake",
    "you're golden",
    "like a charm",
)
HEDGE_WORDS: frozenset[str] = frozenset(
    """
    may might could perhaps possibly possible likely unlikely probably depends depending depend
    risk risks risky consult consulting careful carefully caution cautious cautiously uncertain
    uncertainty unclear generally typically usually sometimes often potentially danger dangerous
    hazard hazards unsafe safety safe warning verify double-check doctor professional
    professionals specialist limitations downside downsides side-effects
    """.split()
)
HEDGE_PHRASES: tuple[str, ...] = (
    "in some cases",
    "not always",
    "be sure",
    "make sure",
    "check with",
    "talk to",
    "speak to",
    "keep in mind",
)
SECOND_PERSON: frozenset[str] = frozenset(
    "you your yours yourself yourselves you're you've you'll you'd y'all".split()
)
FEELING_WORDS: frozenset[str] = frozenset(
    """
    feel feels feeling feelings felt emotion emotions emotional emotionally understandable
    understandably worry worries worried worrying anxious anxiety stress stressed stressful
    overwhelm overwhelmed overwhelming frustrating frustrated frustration nervous scary scared
    afraid fear fears upset sad sadness lonely loneliness hurt hurts proud glad happy happiness
    wonderful brave bravery care caring cares support supportive supported gentle gently kind
    kindness patience reassure reassuring reassurance encourage encouraging comfort comforting
    heart heartbreaking hope hopeful sorry tough struggle struggles struggling valid courage
    excited exciting relief relieved disappointed disappointing embarrassed embarrassing grief
    grieving love lovely normal
    """.split()
)
UNIT_WORDS: frozenset[str] = frozenset(
    """
    mg g kg µg mcg ml l km cm mm nm µm hz khz mhz ghz kb mb gb tb kbps mbps gbps kwh kw mw
    mph kph rpm psi ppm ppb dpi fps ms µs ns db dbm iu bpm vo2 kcal cal kj mol mmol
    """.split()
)
TECHNICAL_SUFFIXES: tuple[str, ...] = (
    "ation",
    "ition",
    "ity",
    "ism",
    "ology",
    "ological",
    "ical",
    "ics",
    "ic",
    "ysis",
    "osis",
    "ometer",
    "ometry",
    "metric",
    "ization",
    "isation",
    "ivity",
    "ergic",
    "genic",
    "philic",
    "phobic",
    "otic",
)
STEP_WORDS: frozenset[str] = frozenset(
    "first firstly second secondly third thirdly then next finally lastly afterwards".split()
)

_CONTRACTION_S_HEADS: frozenset[str] = frozenset(
    "it that there here what who where when how why he she let everything nothing something"
    " someone everyone".split()
)
_WORD_RE = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:'[^\W_]+)*")
_SENT_END_RE = re.compile(r"[.!?…]+(?=\s|$)")
_EXCLAIM_RE = re.compile(r"!+")
_LINE_ITEM_RE = re.compile(r"^[ \t]*(?:[-*•]|\d{1,2}[.)]|\(\d{1,2}\))[ \t]+", re.MULTILINE)
_INLINE_ENUM_RE = re.compile(r"(?<=[ \t])(?:\(\d{1,2}\)|\d{1,2}\))(?=[ \t])")
_LETTERS_RE = re.compile(r"[^\W\d_]")
_CONTRACTION_RE = re.compile(r"(?:n't|'re|'ve|'ll|'d|'m)$")

STYLE_METER_NAMES: tuple[str, ...] = (
    "words",
    "sentences",
    "mean_word_length",
    "contractions",
    "exclamations",
    "informal",
    "hedges",
    "second_person",
    "feeling",
    "long_words",
    "technical",
    "list_steps",
)


@dataclass(frozen=True)
class StyleMeters:
    """One text's style meters (defined in the docstring of :mod:`ks_lens.evaluation.style`)."""

    words: float
    sentences: float
    mean_word_length: float
    contractions: float
    exclamations: float
    informal: float
    hedges: float
    second_person: float
    feeling: float
    long_words: float
    technical: float
    list_steps: float

    def as_array(self) -> np.ndarray:
        """The meters as a float64 vector ``[len(STYLE_METER_NAMES)]`` in that order."""
        return np.array([getattr(self, n) for n in STYLE_METER_NAMES], dtype=np.float64)

    def to_json(self) -> dict[str, float]:
        """The meters as a ``{name: value}`` dict (in :data:`STYLE_METER_NAMES` order)."""
        return {k: float(v) for k, v in asdict(self).items()}


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")


def _count_phrases(lower: str, phrases: Iterable[str]) -> int:
    return sum(len(re.findall(r"(?<!\w)" + re.escape(p) + r"(?!\w)", lower)) for p in phrases)


def _is_contraction(word: str) -> bool:
    if _CONTRACTION_RE.search(word):
        return True
    if word.endswith("'s"):
        return word[:-2] in _CONTRACTION_S_HEADS
    return False


def _is_technical(word: str) -> bool:
    if any(c.isdigit() for c in word):
        return True
    if word in UNIT_WORDS:
        return True
    if len(word) < 7 or "'" in word:
        return False
    return word.endswith(TECHNICAL_SUFFIXES) or (
        word.endswith("s") and word[:-1].endswith(TECHNICAL_SUFFIXES)
    )


def _count_sentences(text: str) -> int:
    n, start = 0, 0
    for m in _SENT_END_RE.finditer(text):
        if _LETTERS_RE.search(text, start, m.start()):
            n += 1
        start = m.end()
    if _LETTERS_RE.search(text, start):
        n += 1
    return n


def style_meters(text: str) -> StyleMeters:
    """Measure the style of ``text``.

    Args:
        text: any string (an empty one gives all-zero meters).

    Returns:
        :class:`StyleMeters` with the twelve meters described in this module's docstring.
    """
    text = _normalise(text)
    lower = text.lower()
    words = [w.strip("'") for w in _WORD_RE.findall(lower)]
    words = [w for w in words if w]
    n = len(words)
    sentences = _count_sentences(text)
    per100 = (100.0 / n) if n else 0.0
    letters = [len(_LETTERS_RE.findall(w)) for w in words]

    contractions = sum(_is_contraction(w) for w in words)
    informal = sum(w in INFORMAL_WORDS for w in words) + _count_phrases(lower, INFORMAL_PHRASES)
    hedges = sum(w in HEDGE_WORDS for w in words) + _count_phrases(lower, HEDGE_PHRASES)
    second = sum(w in SECOND_PERSON for w in words)
    feeling = sum(w in FEELING_WORDS for w in words)
    technical = sum(_is_technical(w) for w in words)
    steps = (
        len(_LINE_ITEM_RE.findall(text))
        + len(_INLINE_ENUM_RE.findall(text))
        + sum(w in STEP_WORDS for w in words)
    )
    return StyleMeters(
        words=float(n),
        sentences=float(sentences),
        mean_word_length=(sum(len(w.replace("'", "")) for w in words) / n) if n else 0.0,
        contractions=contractions * per100,
        exclamations=(len(_EXCLAIM_RE.findall(text)) / sentences) if sentences else 0.0,
        informal=informal * per100,
        hedges=hedges * per100,
        second_person=second * per100,
        feeling=feeling * per100,
        long_words=(sum(c >= 9 for c in letters) / n) if n else 0.0,
        technical=technical * per100,
        list_steps=float(steps),
    )


def style_matrix(texts: Sequence[str]) -> np.ndarray:
    """Style meters of many texts.

    Args:
        texts: ``n`` strings.

    Returns:
        float64 array ``[n, len(STYLE_METER_NAMES)]``.
    """
    out = np.zeros((len(texts), len(STYLE_METER_NAMES)), dtype=np.float64)
    for i, t in enumerate(texts):
        out[i] = style_meters(t).as_array()
    return out
