r"""An episode as Qwen2.5-VL chat messages: the layer every VLM backend shares.

The environment's text-mode observation is ``{"text": str, "images": (H, W, 3) uint8, ...}``.
A `Conversation` turns observations and model turns into

- the Hugging Face message list (``{"role": ..., "content": [{"type": "image"}, ...,
  {"type": "text", "text": ...}]}``) that ``processor.apply_chat_template`` takes,
  with the images kept apart in the order their ``{"type": "image"}`` items appear;
- the same conversation rendered as prompt text with the Qwen2-VL chat-template
  conventions (`render_messages` is that template written out in Python); and
- the text of each new observation *as a continuation* of what the model generated,
  so that a rollout keeps ``token ids = prompt + generated + tool output + ...``
  without re-tokenizing generated text (the ids are what the policy was scored on).

At reset the images come before the text (the original image, or the video's frames,
then the question); after an operation the text comes first ("Here is the cropped
image ..."), then the image(s); an error observation is text only.

The system prompt is the standard Qwen2.5 / Hermes tool prompt: the released model
called tools only under exactly this layout. A from-scratch model may use another
`ChatFormat` (a short system prompt, the question before the image): its checkpoint
carries the format (`save_chat_format`), and `load_chat_format` gives it back, or the
standard format for checkpoints without one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pxr_env.tools import TOOL_SCHEMAS

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
GENERATION_PROMPT = f"{IM_START}assistant\n"

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat template (Jinja), as its checkpoints ship it; `render_messages` is its Python twin."""

INSTRUCTION = (
    "You are a helpful assistant. Answer the question about the image or video. "
    "Think step by step. When a detail is too small to see, call a tool to look closer: "
    "write the call inside <tool_call></tool_call>. "
    "Put the final answer in \\boxed{}, for example \\boxed{B} or \\boxed{7}."
)
"""The task instruction that opens the system prompt, before the tool block."""

Message = dict[str, Any]

CHAT_FORMAT_FILE = "chat_format.json"
"""File of a checkpoint folder that holds its `ChatFormat` (absent: the standard format)."""


@dataclass(frozen=True)
class ChatFormat:
    """How a policy's conversations are laid out; the standard one is Qwen2.5-VL's."""

    system: str | None = None
    """System prompt text; None is the standard tool prompt (`system_prompt()`)."""
    question_first: bool = False
    """Put the question text before the image(s) in the first user message (a causal model
    can then condition its image tokens on the question)."""
    vision_ids: bool = False
    """Write ``Picture k: `` before each image, k counting the conversation's images from 1 (the
    chat template's ``add_vision_id``): the initial frames of a video then carry the numbers
    ``select_frames`` takes, which a model that sees frames as separate images cannot
    otherwise read off its input."""

    def conversation(self) -> "Conversation":
        """A new `Conversation` in this format."""
        return Conversation(system=self.system, question_first=self.question_first, vision_ids=self.vision_ids)


def save_chat_format(chat_format: ChatFormat, directory: str | Path) -> Path:
    """Write `chat_format` into a checkpoint folder (next to the processor files)."""
    path = Path(directory) / CHAT_FORMAT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(chat_format), indent=2) + "\n")
    return path


def load_chat_format(directory: str | Path) -> ChatFormat:
    """The `ChatFormat` saved in a checkpoint folder, or the standard one when it has none."""
    path = Path(directory) / CHAT_FORMAT_FILE
    if not path.is_file():
        return ChatFormat()
    data = json.loads(path.read_text())
    unknown = sorted(set(data) - {"system", "question_first", "vision_ids"})
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; expected 'system', 'question_first' and 'vision_ids'")
    return ChatFormat(**data)


def system_prompt(tools: Sequence[Mapping[str, Any]] = TOOL_SCHEMAS, instruction: str = INSTRUCTION) -> str:
    """The system prompt: `instruction`, then the Qwen2.5 / Hermes tool block.

    The block is what Qwen2.5's own chat template writes for ``tools=``: one JSON schema
    per line inside ``<tools></tools>`` (``json.dumps`` defaults, as the template's
    ``tojson`` filter), then the ``<tool_call>`` format line.
    """
    schemas = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        f"{instruction}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{schemas}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def _is_image(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _render_content(content: str | Sequence[Mapping[str, Any]], vision_id: int | None = None) -> str:
    """A message's content as text; with `vision_id`, images are labelled ``Picture k: `` from k = `vision_id`."""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        if _is_image(item):
            if vision_id is not None:
                parts.append(f"Picture {vision_id}: ")
                vision_id += 1
            parts.append(IMAGE_PLACEHOLDER)
        elif "text" in item:
            parts.append(item["text"])
        else:
            raise ValueError(f"cannot render content item of type {item.get('type')!r}: expected 'image' or 'text'")
    return "".join(parts)


def _render_message(message: Message, vision_id: int | None = None) -> str:
    return f"{IM_START}{message['role']}\n{_render_content(message['content'], vision_id)}{IM_END}\n"


def _image_count(message: Message) -> int:
    content = message["content"]
    return 0 if isinstance(content, str) else sum(map(_is_image, content))


def render_messages(messages: Sequence[Message], add_generation_prompt: bool = True,
                    add_vision_id: bool = False) -> str:
    """Render messages exactly as the Qwen2-VL chat template does (without video items).

    Each message is ``<|im_start|>{role}\n{content}<|im_end|>\n``; an image item renders
    as ``<|vision_start|><|image_pad|><|vision_end|>`` (after ``Picture k: `` with
    `add_vision_id`, k counting the images from 1); a conversation that does not open
    with a system message gets the default one; the generation prompt is
    ``<|im_start|>assistant\n``.
    """
    out = []
    if messages and messages[0]["role"] != "system":
        out.append(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
    seen = 0
    for message in messages:
        out.append(_render_message(message, seen + 1 if add_vision_id else None))
        seen += _image_count(message)
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def _check_observation(obs: Mapping[str, Any]) -> tuple[str, tuple[np.ndarray, ...]]:
    if not isinstance(obs, Mapping) or "text" not in obs or "images" not in obs:
        raise ValueError("an observation must be the env's text-mode dict {'text': str, 'images': tuple of arrays}")
    text, images = obs["text"], tuple(obs["images"])
    if not isinstance(text, str):
        raise ValueError(f"observation 'text' must be a str, got {type(text).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"observation image {i} must be an (H, W, 3) uint8 array")
    return text, images


class Conversation:
    """One episode as chat messages plus its images, built turn by turn.

    Usage in a rollout::

        conv = Conversation()
        prompt_text = conv.add_observation(obs)          # the whole first prompt
        ... generate -> generated ids, decoded as `turn` (special tokens kept) ...
        conv.add_assistant(turn)
        obs, ... = env.step(turn)
        segment = conv.add_observation(obs)               # text to append after the ids
        new_images = conv.images[-len(obs["images"]):]    # the segment's images, if any

    `add_observation` returns the text that extends the token stream so far: right after
    it, ``render()`` equals the concatenation of every returned segment and every
    assistant turn as generated. A turn that stopped at the end-of-turn token keeps it
    (``...<|im_end|>``): the next segment then starts with ``\n``; a turn that stopped on
    a stop string (``</tool_call>``) or on the token limit does not, and the segment
    closes it with ``<|im_end|>\n``. Padding tokens of a batched generation must be
    removed before decoding.
    """

    def __init__(self, system: str | None = None, question_first: bool = False, vision_ids: bool = False) -> None:
        self.question_first, self.vision_ids = question_first, vision_ids
        self.messages: list[Message] = [
            {"role": "system", "content": [{"type": "text", "text": system_prompt() if system is None else system}]}
        ]
        self.images: list[np.ndarray] = []
        self._closed = True

    @property
    def num_turns(self) -> int:
        """Assistant turns so far."""
        return sum(m["role"] == "assistant" for m in self.messages)

    def add_observation(self, obs: Mapping[str, Any]) -> str:
        """Append an observation as a user message; return its text as a continuation.

        The first observation (reset) puts its images before its text (after it with
        ``question_first``) and returns the whole prompt (system and user message and the
        generation prompt); later ones put
        the text first and return ``[<|im_end|>]\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n``.
        """
        text, images = _check_observation(obs)
        first = len(self.messages) == 1
        if not first and self.messages[-1]["role"] != "assistant":
            raise ValueError("add_assistant(turn) must come between two observations")
        image_items: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        text_items = [{"type": "text", "text": text}] if text else []
        content = image_items + text_items if first and not self.question_first else text_items + image_items
        if not content:
            raise ValueError("an observation needs text or images")
        message = {"role": "user", "content": content}
        self.messages.append(message)
        user = _render_message(message, len(self.images) + 1 if self.vision_ids else None) + GENERATION_PROMPT
        self.images.extend(images)
        if first:
            return _render_message(self.messages[0]) + user
        closer = "\n" if self._closed else f"{IM_END}\n"
        return closer + user

    def add_assistant(self, turn: str) -> None:
        """Append a model turn as generated (a trailing ``<|im_end|>`` is recognised and kept out of the message)."""
        if self.messages[-1]["role"] != "user":
            raise ValueError("add_observation(obs) must come before each assistant turn")
        self._closed = turn.endswith(IM_END)
        content = turn[: -len(IM_END)] if self._closed else turn
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": content}]})

    def render(self, add_generation_prompt: bool = True) -> str:
        """The whole conversation as prompt text (the chat template's output)."""
        return render_messages(self.messages, add_generation_prompt=add_generation_prompt, add_vision_id=self.vision_ids)
