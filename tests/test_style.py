"""Style meters: exact values on hand-made texts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ks_lens.evaluation.style import STYLE_METER_NAMES, StyleMeters, style_matrix, style_meters


def _check(text: str, **expected: float) -> None:
    m = style_meters(text)
    for name in STYLE_METER_NAMES:
        assert getattr(m, name) == pytest.approx(expected.get(name, 0.0), abs=1e-12), name


def test_names_match_fields_and_array_order():
    assert tuple(f.name for f in dataclasses.fields(StyleMeters)) == STYLE_METER_NAMES
    m = style_meters("Honestly, it's fine! You could try it.")
    arr = m.as_array()
    assert arr.dtype == np.float64 and arr.shape == (len(STYLE_METER_NAMES),)
    assert list(m.to_json()) == list(STYLE_METER_NAMES)
    assert arr.tolist() == list(m.to_json().values())


def test_casual_example():
    # words: honestly it's fine you could try it (7); "it's" -> 3 characters
    _check(
        "Honestly, it's fine! You could try it.",
        words=7,
        sentences=2,
        mean_word_length=28 / 7,
        contractions=100 / 7,
        exclamations=0.5,
        informal=100 / 7,
        hedges=100 / 7,
        second_person=100 / 7,
    )


def test_expert_example():
    # 30.5 is one word; technical: hydrolysis, 30.5, kj, mol, conditions (plural of -ition);
    # "releases" is not technical; long words: hydrolysis, conditions
    _check(
        "Hydrolysis of ATP releases 30.5 kJ/mol under standard conditions.",
        words=10,
        sentences=1,
        mean_word_length=5.5,
        long_words=0.2,
        technical=50.0,
    )


def test_empathetic_example_with_curly_apostrophe():
    _check(
        "I'm so sorry you\u2019re feeling overwhelmed; that sounds really tough.",
        words=10,
        sentences=1,
        mean_word_length=5.3,
        contractions=20.0,  # I'm, you're
        second_person=10.0,  # you're
        feeling=40.0,  # sorry, feeling, overwhelmed, tough
        long_words=0.1,  # overwhelmed
    )


def test_list_steps_and_sentences():
    # line items "1." and "2)", inline "(3)", step words first + then; "1." alone is no sentence
    _check(
        "First, unplug it.\n1. Open the lid\n2) Remove the filter (3) rinse it, then dry it",
        words=17,
        sentences=2,
        mean_word_length=57 / 17,
        technical=300 / 17,  # 1, 2, 3
        list_steps=5,
    )
    assert style_meters("- milk\n- eggs\n* bread").list_steps == 3


def test_possessive_exclamations_and_numbers():
    # John's is possessive (no contraction); 10,935 is one (technical) word; "!!!" is one run
    _check(
        "John's dog can't swim. Really!!! Wow! 10,935 m.",
        words=8,
        sentences=4,
        mean_word_length=4.0,
        contractions=12.5,
        exclamations=0.5,
        informal=12.5,
        technical=12.5,
    )


def test_hedge_and_informal_phrases():
    m = style_meters("It depends, but no biggie.")
    # words: it depends but no biggie (5); hedges: "depends"
    assert m.words == 5
    assert m.hedges == pytest.approx(20.0)
    assert style_meters("Keep in mind it may vary.").hedges == pytest.approx(2 / 6 * 100)
    assert m.informal == pytest.approx(20.0)  # "no biggie"


def test_empty_and_punctuation_only():
    _check("")
    _check("   ")
    _check("?!", exclamations=0.0)


def test_style_matrix_matches_meters():
    texts = ["Yep!", "Consult a doctor first.", ""]
    mat = style_matrix(texts)
    assert mat.shape == (3, len(STYLE_METER_NAMES))
    for row, t in zip(mat, texts, strict=True):
        np.testing.assert_array_equal(row, style_meters(t).as_array())
    assert style_matrix([]).shape == (0, len(STYLE_METER_NAMES))
