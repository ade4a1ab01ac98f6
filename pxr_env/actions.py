r"""Text turn -> what it asks for: a tool call, a final answer, or an error.

A language-model policy writes one turn of text per step. `parse_turn` reads it with
these rules, in this order; it never raises on a ``str`` and runs in time linear in the
length of the turn.

1. **Length.** A turn longer than `max_chars` is an error; it is not scanned.
2. **Tool call.** If the turn contains ``<tool_call>`` it is a tool call (Qwen2.5 /
   Hermes format)::

       <tool_call>
       {"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.5, 0.6], "target_image": 1}}
       </tool_call>

   The body is the text between the *last* ``<tool_call>`` and the next
   ``</tool_call>``, or the end of the turn when the closing tag is missing (generation
   often stops at it or strips it). The body is parsed with `json.loads`, never
   evaluated. It must be an object with a string ``"name"`` and an object
   ``"arguments"``; a JSON string holding an object is accepted as ``"arguments"``,
   since some models double-encode it. ``NaN`` / ``Infinity`` literals are rejected;
   numbers too large for a float (``1e999``) come through as ``inf`` and are rejected
   by the operations. Nesting deeper than `MAX_JSON_DEPTH` is an error. The tool name
   is not checked here; the environment does that.

   A tool call takes precedence over an answer in the same turn: the policy asked to
   look, so the episode goes on. A malformed tool call is reported as such even when
   the turn also holds an answer, so that the policy can fix the call.
3. **Final answer** (`extract_answer`), first match wins:

   a. the last ``\boxed{...}`` whose braces balance (nested braces allowed); a
      ``\text{...}`` (or ``\textbf``, ``\mathrm``, ``\mathbf``) wrapper around the
      whole content is removed. An empty ``\boxed{}`` is an error.
   b. the last line that starts with ``Answer:``, ``Final answer:`` or
      ``The answer is`` (case-insensitive; leading markdown ``*``, ``#``, ``>``, ``_``
      allowed) and has text after it: the rest of that line, with surrounding ``*``
      and a trailing period removed. ``(B)`` is kept as written; scoring reads it.

4. Anything else is an error.

Error messages are written for the policy: the environment shows them after
``Execution error: ``. They are the constants and templates below (``ERROR_*``); a JSON
error gives json's message and position and at most 30 characters from that position.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a tool call (real calls use 2 or 3)."""

MAX_INT_DIGITS = 300
"""Integer literals with more digits become floats (``inf``), like ``1e999`` does."""

ERROR_TOO_LONG = "turn is too long ({length} characters, limit {limit}): write a shorter turn"
ERROR_EMPTY_CALL = (
    'empty tool call: put a JSON object {"name": ..., "arguments": {...}} '
    "between <tool_call> and </tool_call>"
)
ERROR_BAD_JSON = "tool call is not valid JSON: {detail}"
ERROR_NOT_FINITE = "tool call contains {literal}, which is not a number: use finite numbers"
ERROR_TOO_DEEP = f"tool call JSON is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
ERROR_NOT_OBJECT = (
    'tool call must be a JSON object {{"name": ..., "arguments": {{...}}}}, got a JSON {kind}'
)
ERROR_NO_NAME = 'tool call has no "name": give the tool name as a string'
ERROR_NAME_TYPE = 'tool call "name" must be a string, got a JSON {kind}'
ERROR_NO_ARGUMENTS = 'tool call has no "arguments": give them as an object, e.g. "arguments": {...}'
ERROR_ARGUMENTS_TYPE = 'tool call "arguments" must be a JSON object, got a JSON {kind}'
ERROR_EMPTY_ANSWER = r"empty answer: put the answer inside \boxed{...}"
ERROR_NOTHING = (
    "no tool call and no final answer: write <tool_call>{...}</tool_call> "
    r"to use a tool or \boxed{answer} to answer"
)

_NEAR_CHARS = 30
_OPEN_TAG = "<tool_call>"
_CLOSE_TAG = "</tool_call>"
_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
_JSON_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{", re.IGNORECASE)
_ANSWER_LINE = re.compile(
    r"^[ \t*#>_]*(?:final[ \t]+answer[*_]*[ \t]*:|answer[*_]*[ \t]*:|the[ \t]+answer[ \t]+is\b[*_]*[ \t]*:?)"
    r"([^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class ToolCall:
    """A well-formed tool call; `name` is not yet checked against the tools offered."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedTurn:
    """What one turn asks for: exactly one of `tool_call`, `answer` and `error` is set."""

    tool_call: ToolCall | None
    answer: str | None
    error: str | None


class _NonFiniteLiteral(ValueError):
    """Raised from `json.loads` on ``NaN``, ``Infinity`` or ``-Infinity``."""


def _reject_constant(literal: str) -> Any:
    raise _NonFiniteLiteral(literal)


def _parse_int(digits: str) -> int | float:
    # Python refuses to convert integers of more than 4300 digits; beyond a few hundred
    # digits the value is useless anyway, so it becomes a float like 1e999 does.
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _too_deep(body: str) -> bool:
    """Whether brackets outside JSON strings nest deeper than `MAX_JSON_DEPTH` (one pass)."""
    depth = 0
    in_string = False
    for token in _JSON_TOKEN.finditer(body):
        t = token.group()
        if t == '"':
            in_string = not in_string
        elif in_string or t[0] == "\\":
            continue
        elif t in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _loads(body: str) -> tuple[Any, str | None]:
    """`json.loads` with the checks above; returns (value, None) or (None, error)."""
    if _too_deep(body):
        return None, ERROR_TOO_DEEP
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_int=_parse_int), None
    except _NonFiniteLiteral as exc:
        return None, ERROR_NOT_FINITE.format(literal=exc.args[0])
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
        near = exc.doc[exc.pos : exc.pos + _NEAR_CHARS]
        if near:
            detail += f" near {near!r}"
        return None, ERROR_BAD_JSON.format(detail=detail)
    except RecursionError:
        return None, ERROR_TOO_DEEP


def _parse_tool_call(text: str, start: int) -> ParsedTurn:
    """Parse the body that starts right after the last ``<tool_call>`` at `start`."""
    end = text.find(_CLOSE_TAG, start)
    body = (text[start:] if end < 0 else text[start:end]).strip()
    if not body:
        return ParsedTurn(None, None, ERROR_EMPTY_CALL)
    value, error = _loads(body)
    if error is not None:
        return ParsedTurn(None, None, error)
    if not isinstance(value, dict):
        return ParsedTurn(None, None, ERROR_NOT_OBJECT.format(kind=_json_kind(value)))
    if "name" not in value:
        return ParsedTurn(None, None, ERROR_NO_NAME)
    name = value["name"]
    if not isinstance(name, str):
        return ParsedTurn(None, None, ERROR_NAME_TYPE.format(kind=_json_kind(name)))
    if "arguments" not in value:
        return ParsedTurn(None, None, ERROR_NO_ARGUMENTS)
    arguments = value["arguments"]
    if isinstance(arguments, str):
        decoded, error = _loads(arguments)
        if error is not None or not isinstance(decoded, dict):
            return ParsedTurn(None, None, ERROR_ARGUMENTS_TYPE.format(kind="string"))
        arguments = decoded
    if not isinstance(arguments, dict):
        return ParsedTurn(None, None, ERROR_ARGUMENTS_TYPE.format(kind=_json_kind(arguments)))
    return ParsedTurn(ToolCall(name=name, arguments=arguments), None, None)


def _closes_at_end(content: str, open_end: int) -> bool:
    """Whether the brace opened just before `open_end` closes at the last character."""
    depth = 1
    for brace in _BRACE.finditer(content, open_end):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return brace.end() == len(content)
    return False


def _unwrap(content: str) -> str:
    """Remove one ``\\text{...}``-like wrapper that spans the whole content."""
    wrapper = _WRAPPER.match(content)
    if wrapper and content.endswith("}") and _closes_at_end(content, wrapper.end()):
        return content[wrapper.end() : -1].strip()
    return content


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance, or None."""
    opens = [m.end() for m in _BOXED.finditer(text)]
    if not opens:
        return None
    closes: dict[int, int] = {}
    stack: list[int] = []
    for brace in _BRACE.finditer(text, opens[0] - 1):
        if brace.group() == "{":
            stack.append(brace.end())
        elif stack:
            closes[stack.pop()] = brace.start()
    for start in reversed(opens):
        if start in closes:
            return _unwrap(text[start : closes[start]].strip())
    return None


def _answer_line(text: str) -> str | None:
    """The answer from the last ``Answer:``-style line that has text after the prefix."""
    found = None
    for line in _ANSWER_LINE.finditer(text):
        value = line.group(1).strip().strip("*_").strip()
        if value.endswith("."):
            value = value[:-1].rstrip()
        if value:
            found = value
    return found


def extract_answer(text: str) -> str | None:
    r"""The final answer in `text` (rule 3 of the module doc), or None if there is none.

    Returns ``""`` for an empty ``\boxed{}``, so callers can tell "answered nothing" from
    "did not answer".
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    return _answer_line(text)


def parse_turn(text: str, max_chars: int = 200_000) -> ParsedTurn:
    """Read one model turn by the rules of the module doc; never raises on a ``str``."""
    if len(text) > max_chars:
        return ParsedTurn(None, None, ERROR_TOO_LONG.format(length=len(text), limit=max_chars))
    tag = text.rfind(_OPEN_TAG)
    if tag >= 0:
        return _parse_tool_call(text, tag + len(_OPEN_TAG))
    answer = extract_answer(text)
    if answer is None:
        return ParsedTurn(None, None, ERROR_NOTHING)
    if not answer:
        return ParsedTurn(None, None, ERROR_EMPTY_ANSWER)
    return ParsedTurn(None, answer, None)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The canonical text of a tool call, as scripted policies and synthesized traces write it."""
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, allow_nan=False)
    # "<" only occurs inside JSON strings; escaping it keeps a "</tool_call>" in a string
    # from ending the call early.
    payload = payload.replace("<", "\\u003c")
    return f"{_OPEN_TAG}\n{payload}\n{_CLOSE_TAG}"


def format_answer(answer: str) -> str:
    r"""The canonical final answer ``\boxed{answer}``; the braces in `answer` must balance."""
    depth = 0
    for brace in _BRACE.finditer(answer):
        depth += 1 if brace.group() == "{" else -1
        if depth < 0:
            break
    if depth != 0:
        raise ValueError(f"answer {answer!r} has unbalanced braces and would not parse back")
    return f"\\boxed{{{answer}}}"
