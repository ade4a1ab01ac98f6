"""Answer matching: is a final answer correct?

`score_answer` dispatches on the sample's answer type:

- ``"choice"``: golds are letters (``"A"``, ``"B"``, ...) indexing the choices; the
  prediction is read by `match_choice` (a letter in the usual forms, or an option's text).
- ``"number"``: counting answers; the first number in the prediction (`parse_number`)
  must equal a gold number exactly.
- ``"text"``: `normalize_text` of the prediction equals that of a gold answer.
- ``"anls"``: `anls` with threshold 0.5, the InfographicsVQA metric.

Scores lie in [0, 1] and are 0 or 1 except for ANLS.
"""

from __future__ import annotations

import re
from typing import Sequence

ANSWER_TYPES: tuple[str, ...] = ("choice", "number", "text", "anls")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_END_PUNCTUATION = " \t\n\r.,;:!?\"'`*()[]{}<>"
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS: dict[str, int] = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER = re.compile(
    r"(?P<digits>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)|[-+]?\.\d+)"
    r"|\b(?P<word>" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)
_BARE_LETTER = re.compile(r"\s*[(\[]?\s*(?:(?i:option|choice)\s*)?([A-Za-z])\s*[)\]]?\s*[.:]?\s*")
_LEADING_LETTER = re.compile(r"\s*(?:(?i:option|choice)\s+([A-Za-z])\b|[(\[]?([A-Z])\s*[).:\]])")


def normalize_text(s: str) -> str:
    """Lowercase, trim punctuation at both ends, drop the articles a/an/the, collapse spaces.

    The trimmed punctuation is ``. , ; : ! ? " ' ` * ( ) [ ] { } < >``; signs, ``%`` and
    ``$`` are kept because they change the meaning. Articles are kept when they are all
    there is, so that ``"a"`` does not become empty.
    """
    words = s.lower().strip(_END_PUNCTUATION).split()
    content = [w for w in words if w not in _ARTICLES]
    return " ".join(content or words)


def parse_number(s: str) -> float | None:
    """The first number in `s`: digits (``"4"``, ``"4.0"``, ``"1,234"``, ``"-3"``) or a word
    from zero to twenty; None if there is none. ``" 12 apples"`` gives 12.0.
    """
    match = _NUMBER.search(s)
    if match is None:
        return None
    if match.group("word") is not None:
        return float(_NUMBER_WORDS[match.group("word").lower()])
    return float(match.group("digits").replace(",", ""))


def _levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_one(prediction: str, gold: str, threshold: float) -> float:
    longest = max(len(prediction), len(gold))
    if longest == 0:
        return 1.0
    # The edit distance is at least the length difference: skip the quadratic work when
    # that alone already reaches the threshold.
    if abs(len(prediction) - len(gold)) / longest >= threshold:
        return 0.0
    distance = _levenshtein(prediction, gold) / longest
    return 1.0 - distance if distance < threshold else 0.0


def anls(prediction: str, golds: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (InfographicsVQA metric).

    For each gold: 1 - d / max(len), with d the edit distance, or 0 when d / max(len) is at
    least `threshold`; the score is the maximum over golds. Strings are compared lowercased,
    trimmed, with runs of whitespace collapsed, as the official evaluation does.
    """
    if not golds:
        raise ValueError("anls needs at least one gold answer")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"anls threshold must be in (0, 1], got {threshold}")
    pred = " ".join(prediction.lower().split())
    return max(_anls_one(pred, " ".join(g.lower().split()), threshold) for g in golds)


def match_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The letter (``"A"``, ``"B"``, ...) of the option `prediction` names, or None.

    Tried in order: the prediction is only a letter of a choice (``"B"``, ``"(b)"``, ``"B."``,
    ``"Option B"``); it equals an option's text after `normalize_text` (so ``"H"`` names
    the option whose text is H when there are four choices); it starts with a
    letter followed by ``)``, ``.``, ``:`` (``"B) text"``, ``"(B) text"``) or with
    ``"Option B"``. Any other lone letter gives None. Lowercase letters
    count only in the first form, so that ``"a red car"`` is read as text.
    """
    letters = LETTERS[: len(choices)]
    bare = _BARE_LETTER.fullmatch(prediction)
    if bare and bare.group(1).upper() in letters:
        return bare.group(1).upper()
    normalized = normalize_text(prediction)
    for letter, choice in zip(letters, choices):
        if normalize_text(choice) == normalized:
            return letter
    if bare:
        return None
    leading = _LEADING_LETTER.match(prediction)
    if leading:
        letter = (leading.group(1) or leading.group(2)).upper()
        return letter if letter in letters else None
    return None


def score_answer(
    prediction: str, answers: Sequence[str], answer_type: str, choices: Sequence[str] = ()
) -> float:
    """Score of `prediction` against the gold `answers` under `answer_type` (module doc)."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}: expected one of {ANSWER_TYPES}")
    if not answers:
        raise ValueError("score_answer needs at least one gold answer")
    if answer_type == "anls":
        return anls(prediction, answers, threshold=0.5)
    if answer_type == "text":
        normalized = normalize_text(prediction)
        return float(any(normalize_text(gold) == normalized for gold in answers))
    if answer_type == "number":
        golds = [parse_number(gold) for gold in answers]
        if None in golds:
            raise ValueError(f"number answers must contain a number, got {list(answers)}")
        value = parse_number(prediction)
        return float(value is not None and value in golds)
    if not choices:
        raise ValueError("a choice answer needs the choices it indexes")
    return float(match_choice(prediction, choices) in {gold.strip().upper() for gold in answers})
