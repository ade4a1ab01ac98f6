"""Tests for answer matching against hand-computed values."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pxr_env.scoring import anls, match_choice, normalize_text, parse_number, score_answer

CHOICES = ("red car", "blue car", "the green one", "a bicycle")


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("  The Red   Car. ", "red car"),
        ("A bicycle!", "bicycle"),
        ('"Hello, World"', "hello, world"),
        ("(left)", "left"),
        ("an apple and the pear", "apple and pear"),
        ("a", "a"),
        ("The", "the"),
        ("50%", "50%"),
        ("-3", "-3"),
        ("", ""),
    ],
)
def test_normalize_text(text: str, normalized: str) -> None:
    assert normalize_text(text) == normalized


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("4", 4.0),
        ("4.0", 4.0),
        ("four", 4.0),
        ("Seventeen", 17.0),
        ("twenty", 20.0),
        ("zero", 0.0),
        ("1,234", 1234.0),
        ("12345", 12345.0),
        (" 12 apples", 12.0),
        ("there are 3 cats and 4 dogs", 3.0),
        ("two or 5", 2.0),
        ("-3 degrees", -3.0),
        ("0.5", 0.5),
        ("4th", 4.0),
        ("1,2345", 1.0),
    ],
)
def test_parse_number(text: str, number: float) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize("text", ["", "none", "someone", "many", "twentyfive"])
def test_parse_number_none(text: str) -> None:
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("prediction", "golds", "score"),
    [
        ("hello", ["helo"], 0.8),  # 1 deletion over max length 5
        ("abc", ["xyz"], 0.0),  # distance 3/3 >= 0.5
        ("Hello ", ["hello"], 1.0),  # case and outer whitespace ignored
        ("new  york", ["New York"], 1.0),  # inner whitespace collapsed
        ("kitten", ["sitting"], 1 - 3 / 7),  # classic distance 3, max length 7
        ("abcd", ["abxy"], 0.0),  # distance 2/4 = 0.5 reaches the threshold
        ("abcd", ["wxyz", "abcx"], 0.75),  # max over golds
        ("", [""], 1.0),
        ("a", [""], 0.0),
    ],
)
def test_anls(prediction: str, golds: list[str], score: float) -> None:
    assert anls(prediction, golds) == pytest.approx(score)


def test_anls_threshold() -> None:
    assert anls("abcd", ["abxy"], threshold=0.6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="threshold"):
        anls("a", ["a"], threshold=0.0)
    with pytest.raises(ValueError, match="at least one gold"):
        anls("a", [])


def test_anls_long_prediction_is_fast() -> None:
    start = time.perf_counter()
    assert anls("x" * 200_000, ["short gold"]) == 0.0
    assert time.perf_counter() - start < 0.1


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20), st.lists(st.text(max_size=20), min_size=1, max_size=3))
def test_anls_bounds(prediction: str, golds: list[str]) -> None:
    score = anls(prediction, golds)
    assert score == 0.0 or 0.5 < score <= 1.0
    assert anls(prediction, [*golds, prediction]) == 1.0


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("[C]", "C"),
        ("B.", "B"),
        ("(B).", "B"),
        ("Option B", "B"),
        ("option d", "D"),
        ("B) blue car", "B"),
        ("(C) whatever", "C"),
        ("A: red car", "A"),
        ("Choice C is right", "C"),
        ("Blue car.", "B"),
        ("green one", "C"),
        ("bicycle", "D"),
        ("E", None),
        ("(F) something", None),
        ("a purple car", None),
        ("I think so", None),
        ("", None),
    ],
)
def test_match_choice(prediction: str, letter: str | None) -> None:
    assert match_choice(prediction, CHOICES) == letter


def test_match_choice_lone_letter_beyond_the_choices_is_an_option_text() -> None:
    glyphs = ["E", "H", "U", "V"]
    assert match_choice("H", glyphs) == "B"
    assert match_choice("(D)", glyphs) == "D"  # a letter of a choice stays the letter
    assert match_choice("K", glyphs) is None


def test_match_choice_lowercase_text_is_not_a_letter() -> None:
    # "a" starting a sentence is an article, not option A.
    assert match_choice("a blue car", CHOICES) == "B"
    assert match_choice("A blue car", CHOICES) == "B"


@pytest.mark.parametrize(
    ("prediction", "answers", "answer_type", "score"),
    [
        ("B", ["B"], "choice", 1.0),
        ("(b)", ["B"], "choice", 1.0),
        ("blue car", ["B"], "choice", 1.0),
        ("A", ["B"], "choice", 0.0),
        ("gibberish", ["B"], "choice", 0.0),
        ("4", ["4"], "number", 1.0),
        ("four", ["4"], "number", 1.0),
        ("4.0 apples", ["4"], "number", 1.0),
        ("5", ["4"], "number", 0.0),
        ("4.5", ["4"], "number", 0.0),
        ("none", ["0"], "number", 0.0),
        ("The Eiffel Tower.", ["eiffel tower"], "text", 1.0),
        ("eiffel", ["eiffel tower"], "text", 0.0),
        ("paris", ["London", "Paris"], "text", 1.0),
        ("helo", ["hello"], "anls", 0.8),
        ("abc", ["xyz"], "anls", 0.0),
    ],
)
def test_score_answer(prediction: str, answers: list[str], answer_type: str, score: float) -> None:
    choices = CHOICES if answer_type == "choice" else ()
    assert score_answer(prediction, answers, answer_type, choices) == pytest.approx(score)


def test_score_answer_errors() -> None:
    with pytest.raises(ValueError, match="unknown answer_type 'letter'"):
        score_answer("A", ["A"], "letter")
    with pytest.raises(ValueError, match="at least one gold"):
        score_answer("A", [], "text")
    with pytest.raises(ValueError, match="needs the choices"):
        score_answer("A", ["A"], "choice")
    with pytest.raises(ValueError, match="must contain a number"):
        score_answer("4", ["many"], "number")
