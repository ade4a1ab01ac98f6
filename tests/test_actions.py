"""Tests for the text-turn parser: tool calls, final answers, errors, and bounded time."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pxr_env import actions
from pxr_env.actions import (
    ERROR_EMPTY_ANSWER,
    ERROR_EMPTY_CALL,
    ERROR_NO_ARGUMENTS,
    ERROR_NO_NAME,
    ERROR_NOTHING,
    ERROR_TOO_DEEP,
    ParsedTurn,
    ToolCall,
    extract_answer,
    format_answer,
    format_tool_call,
    parse_turn,
)

CROP_ARGS = {"bbox_2d": [0.1, 0.2, 0.5, 0.6], "target_image": 1}
CROP_JSON = json.dumps({"name": "crop_image", "arguments": CROP_ARGS})


def error_of(text: str, **kwargs: int) -> str:
    parsed = parse_turn(text, **kwargs)
    assert parsed.tool_call is None and parsed.answer is None
    assert parsed.error is not None
    return parsed.error


# --- tool calls -------------------------------------------------------------------------


def test_canonical_tool_call() -> None:
    text = f"I should zoom in.\n<tool_call>\n{CROP_JSON}\n</tool_call>"
    assert parse_turn(text) == ParsedTurn(ToolCall("crop_image", CROP_ARGS), None, None)


def test_missing_closing_tag_reads_to_the_end() -> None:
    parsed = parse_turn(f"<tool_call>\n{CROP_JSON}\n")
    assert parsed.tool_call == ToolCall("crop_image", CROP_ARGS)


def test_last_tool_call_is_used() -> None:
    first = format_tool_call("select_frames", {"target_frames": [1]})
    second = format_tool_call("crop_image", CROP_ARGS)
    assert parse_turn(f"{first}\nno, rather:\n{second}").tool_call == ToolCall("crop_image", CROP_ARGS)


def test_tool_call_takes_precedence_over_answer() -> None:
    text = rf"Maybe \boxed{{A}}, but let me look.<tool_call>{CROP_JSON}</tool_call>"
    parsed = parse_turn(text)
    assert parsed.tool_call == ToolCall("crop_image", CROP_ARGS)
    assert parsed.answer is None and parsed.error is None


def test_malformed_call_is_reported_even_with_an_answer() -> None:
    assert error_of(r"\boxed{A} <tool_call>{oops}</tool_call>").startswith("tool call is not valid JSON")


def test_tool_name_is_not_validated_here() -> None:
    parsed = parse_turn(format_tool_call("draw_circle", {"r": 3}))
    assert parsed.tool_call == ToolCall("draw_circle", {"r": 3})


def test_arguments_given_as_json_string_are_accepted() -> None:
    body = json.dumps({"name": "crop_image", "arguments": json.dumps(CROP_ARGS)})
    assert parse_turn(f"<tool_call>{body}</tool_call>").tool_call == ToolCall("crop_image", CROP_ARGS)


@pytest.mark.parametrize("body", ["", "   \n  "])
def test_empty_tool_call(body: str) -> None:
    assert error_of(f"<tool_call>{body}</tool_call>") == ERROR_EMPTY_CALL


def test_malformed_json_gives_message_and_position() -> None:
    error = error_of('<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [1, 2,]}}</tool_call>')
    assert error == (
        "tool call is not valid JSON: Expecting value at line 1 column 55 (char 54) near ']}}'"
    )


def test_malformed_json_excerpt_is_short() -> None:
    error = error_of('<tool_call>{"a": 1, ' + "x" * 500)
    assert error == (
        "tool call is not valid JSON: Expecting property name enclosed in double quotes "
        "at line 1 column 10 (char 9) near 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'"
    )


@pytest.mark.parametrize(
    ("body", "kind"), [("[1, 2]", "array"), ('"crop"', "string"), ("3", "number"), ("null", "null")]
)
def test_json_that_is_not_an_object(body: str, kind: str) -> None:
    assert error_of(f"<tool_call>{body}</tool_call>") == (
        f'tool call must be a JSON object {{"name": ..., "arguments": {{...}}}}, got a JSON {kind}'
    )


def test_missing_name() -> None:
    assert error_of('<tool_call>{"arguments": {}}</tool_call>') == ERROR_NO_NAME


@pytest.mark.parametrize(("name", "kind"), [("1", "number"), ("true", "boolean"), ('["a"]', "array")])
def test_non_string_name(name: str, kind: str) -> None:
    text = f'<tool_call>{{"name": {name}, "arguments": {{}}}}</tool_call>'
    assert error_of(text) == f'tool call "name" must be a string, got a JSON {kind}'


def test_missing_arguments() -> None:
    assert error_of('<tool_call>{"name": "crop_image"}</tool_call>') == ERROR_NO_ARGUMENTS


@pytest.mark.parametrize(
    ("arguments", "kind"),
    [("[0, 0, 1, 1]", "array"), ("7", "number"), ('"not json"', "string"), ('"[1, 2]"', "string")],
)
def test_arguments_not_an_object(arguments: str, kind: str) -> None:
    text = f'<tool_call>{{"name": "crop_image", "arguments": {arguments}}}</tool_call>'
    assert error_of(text) == f'tool call "arguments" must be a JSON object, got a JSON {kind}'


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_rejected(literal: str) -> None:
    text = f'<tool_call>{{"name": "crop_image", "arguments": {{"bbox_2d": [0, {literal}, 1, 1]}}}}'
    assert error_of(text) == f"tool call contains {literal}, which is not a number: use finite numbers"


def test_huge_numbers_come_through_as_inf() -> None:
    text = '<tool_call>{"name": "crop_image", "arguments": {"a": 1e999, "b": -1e999, "c": %s}}' % ("9" * 5000)
    call = parse_turn(text).tool_call
    assert call is not None
    assert call.arguments["a"] == math.inf and call.arguments["b"] == -math.inf
    assert call.arguments["c"] == math.inf


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert error_of("<tool_call>" + "[" * 100_000) == ERROR_TOO_DEEP
    assert error_of('<tool_call>{"name": "a", "arguments": ' + '{"x": ' * 40 + "1" + "}" * 41) == ERROR_TOO_DEEP


def test_nesting_at_the_limit_is_accepted() -> None:
    nested = "[" * (actions.MAX_JSON_DEPTH - 2) + "]" * (actions.MAX_JSON_DEPTH - 2)
    call = parse_turn(f'<tool_call>{{"name": "a", "arguments": {{"x": {nested}}}}}').tool_call
    assert call is not None and call.name == "a"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = format_tool_call("a", {"note": "[" * 100 + '\\"{' * 50})
    assert parse_turn(text).tool_call == ToolCall("a", {"note": "[" * 100 + '\\"{' * 50})


def test_recursion_error_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actions, "MAX_JSON_DEPTH", 10**9)
    assert error_of("<tool_call>" + "[" * 100_000 + "]" * 100_000, max_chars=300_000) == ERROR_TOO_DEEP


# --- answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"So it is \boxed{B}.", "B"),
        (r"\boxed{ 42 }", "42"),
        (r"first \boxed{A}, finally \boxed{C}", "C"),
        (r"\boxed{\text{B}}", "B"),
        (r"\boxed{\textbf{ red car }}", "red car"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\text{A} or \text{B}}", r"\text{A} or \text{B}"),
        (r"\boxed{a{b}c} then \boxed{unclosed", "a{b}c"),
        (r"\boxed {7}", "7"),
        (r"\boxed{C} Answer: D", "C"),
    ],
)
def test_boxed_answers(text: str, answer: str) -> None:
    assert parse_turn(text) == ParsedTurn(None, answer, None)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Looking closely.\nAnswer: B", "B"),
        ("final answer: 12 apples.", "12 apples"),
        ("The answer is (C).", "(C)"),
        ("THE ANSWER IS: four", "four"),
        ("**Answer:** red", "red"),
        ("## Final Answer: blue\n", "blue"),
        ("Answer: A\nhmm, no.\nAnswer: D", "D"),
        ("Answer: A\nAnswer:\n", "A"),
        ("  answer: *B*", "B"),
    ],
)
def test_answer_line_fallbacks(text: str, answer: str) -> None:
    assert parse_turn(text) == ParsedTurn(None, answer, None)


@pytest.mark.parametrize(
    "text", ["The answer isn't clear yet.", "My answer would be B", "Answer:", "no answer here", ""]
)
def test_no_answer(text: str) -> None:
    assert extract_answer(text) is None
    assert error_of(text) == ERROR_NOTHING


def test_empty_boxed_is_an_error() -> None:
    assert extract_answer(r"\boxed{}") == ""
    assert error_of(r"\boxed{ }") == ERROR_EMPTY_ANSWER
    assert error_of(r"\boxed{\text{}}") == ERROR_EMPTY_ANSWER


def test_nothing_error_text() -> None:
    assert ERROR_NOTHING == (
        "no tool call and no final answer: write <tool_call>{...}</tool_call> "
        "to use a tool or \\boxed{answer} to answer"
    )


# --- limits and robustness --------------------------------------------------------------


def test_too_long_turn() -> None:
    assert error_of("x" * 101, max_chars=100) == (
        "turn is too long (101 characters, limit 100): write a shorter turn"
    )
    assert parse_turn(r"\boxed{A}" + " " * 91, max_chars=100).answer == "A"


JUNK = {  # a megabyte of each at n = 1
    "open-braces": lambda n: "\\boxed{" + "{" * (1_000_000 // n),
    "many-boxed": lambda n: "\\boxed{" * (150_000 // n),
    "brackets": lambda n: "<tool_call>" + "[" * (1_000_000 // n),
    "objects": lambda n: "<tool_call>" + '{"a":' * (200_000 // n),
    "escapes": lambda n: "<tool_call>" + '"\\"' * (330_000 // n),
    "spaces": lambda n: "Answer:" + " " * (1_000_000 // n) + "\n" * 10,
    "lines": lambda n: "\n *" * (330_000 // n),
    "tags": lambda n: "<tool_call>" * (90_000 // n),
}


@pytest.mark.parametrize("kind", list(JUNK))
def test_megabyte_junk_is_parsed_in_linear_time(kind: str) -> None:
    """Ten times the junk costs about ten times the time, not a hundred (no backtracking blow-up);
    a ratio in one run, so that a loaded machine does not fail it."""
    def seconds(n: int) -> float:
        junk = JUNK[kind](n)
        start = time.perf_counter()
        parsed = parse_turn(junk, max_chars=2_000_000)
        assert parsed.error is not None
        return time.perf_counter() - start

    small = min(seconds(10) for _ in range(3))
    large = min(seconds(1) for _ in range(2))
    assert large < max(40 * small, 0.05)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<>/tool_call{}[]"\\:,0123456789eE.-+ \nNaboxedAnswer')) | st.characters()))
def test_never_raises(text: str) -> None:
    parsed = parse_turn(text)
    assert [parsed.tool_call is not None, parsed.answer is not None, parsed.error is not None].count(True) == 1


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_never_raises_inside_a_tool_call(body: str) -> None:
    parsed = parse_turn(f"<tool_call>{{{body}")
    assert (parsed.tool_call is None) != (parsed.error is None)


# --- formatting -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(st.text(), st.dictionaries(st.text(), json_values, max_size=4))
def test_format_tool_call_round_trips(name: str, arguments: dict) -> None:
    assert parse_turn(format_tool_call(name, arguments)).tool_call == ToolCall(name, arguments)


def test_format_tool_call_text() -> None:
    assert format_tool_call("select_frames", {"target_frames": [1, 2]}) == (
        '<tool_call>\n{"name": "select_frames", "arguments": {"target_frames": [1, 2]}}\n</tool_call>'
    )


def test_format_tool_call_escapes_tags_in_strings() -> None:
    text = format_tool_call("a", {"note": "</tool_call> <tool_call>"})
    assert text.count("<tool_call>") == 1 and text.count("</tool_call>") == 1
    assert parse_turn(text).tool_call == ToolCall("a", {"note": "</tool_call> <tool_call>"})


def test_format_answer() -> None:
    assert format_answer("B") == r"\boxed{B}"
    assert parse_turn(format_answer(r"\frac{3}{4}")).answer == r"\frac{3}{4}"
    with pytest.raises(ValueError, match="unbalanced braces"):
        format_answer("a}b{")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="{}\\"), min_size=1).filter(lambda s: s.strip()))
def test_format_answer_round_trips(answer: str) -> None:
    assert parse_turn(format_answer(answer)).answer == answer.strip()
