"""Build the tiny model's tokenizer: byte-level BPE trained on the project's own text.

    python -m agents.vlm.tiny.build_tokenizer            # rewrites agents/vlm/tiny/tokenizer/
    python -m agents.vlm.tiny.build_tokenizer --out DIR --vocab-size 2048

The corpus is generated, not downloaded: the system prompt, the environment's
observation and error messages (produced by calling the real operations and parser),
questions of the registered synthetic task families plus templated questions of the
same kinds, tool calls and answers. Generation is seeded and the BPE trainer is
deterministic, so the same code gives byte-identical files.

The tokenizer follows Qwen2's conventions: Qwen2's pre-tokenizer split pattern (digits
one by one), byte-level BPE, ``<|endoftext|>`` as padding, ``<|im_end|>`` as end of
turn, the vision and chat special tokens, ``<tool_call>`` / ``</tool_call>`` as added
(non-special) tokens, then the box tokens of `agents.vlm.tiny.boxes` (non-special, so
they survive ``skip_special_tokens``), and the Qwen2-VL chat template.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from agents.vlm.chat import QWEN2_VL_CHAT_TEMPLATE, system_prompt
from agents.vlm.tiny.boxes import BoxVocab
from agents.vlm.tiny.frames import FrameWindows
from pxr_env import ops
from pxr_env.actions import format_answer, format_tool_call, parse_turn

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")
DEFAULT_VOCAB_SIZE = 2048
"""Size of the BPE part (256 byte symbols + merges); special and box tokens come on top."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
)
TOOL_TAGS: tuple[str, ...] = ("<tool_call>", "</tool_call>")
PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<|endoftext|>", "<|im_end|>", "<|image_pad|>"

# Qwen2's pre-tokenizer pattern: contractions, words with one leading non-letter, single
# digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey", "cyan")
SHAPES = ("square", "circle", "triangle", "diamond", "hexagon", "star", "bar", "box", "tag", "sign")
OBJECTS = ("cup", "dog", "car", "person", "bag", "bottle", "clock", "chair", "umbrella", "bicycle", "bird", "book")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle", "near the corner")
REASONING = (
    "The image is large and the {colour} {shape} is small, so I need to look closer.",
    "I cannot read the digit on the {colour} {shape} at this size. Let me zoom in on it.",
    "Let me zoom in on the {colour} {shape} {place}.",
    "The {colour} {shape} is {place} of the image.",
    "The cropped image shows the {colour} {shape} clearly.",
    "The crop does not contain the {colour} {shape}; it must be elsewhere. Let me try another region.",
    "The first crop is too wide to read the detail, so I will zoom in further.",
    "I can see {count} {colour} {shape}s in the image.",
    "The selected frames show the {object} moving {place}.",
    "The {object} appears in frames {a} to {b}.",
    "Looking at the whole image, I see several shapes of different colours.",
    "The question asks about the {object} {place}.",
    "Now I can read it: the answer is {answer}.",
    "So the answer is {answer}.",
)
QUESTIONS = (
    "What digit is written on the {colour} {shape}?",
    "What letter is written on the {colour} {shape}?",
    "What colour is the {shape} marked with the digit {digit}?",
    "Is the {shape} marked with {digit} to the left or to the right of the {shape} marked with {digit2}?",
    "How many {colour} {shape}s are there?",
    "How many {object}s are in the image?",
    "What is the value of the {colour} bar?",
    "Which bar is the tallest?",
    "What is the label of the {colour} bar in the chart?",
    "What colour is the {object}?",
    "Is the {object} on the left or right side of the {object2}?",
    "What is written on the sign {place}?",
    "In which frames does the {colour} {shape} appear?",
    "What does the {object} do after the {colour} {shape} appears?",
    "What happens at the end of the video?",
    "Which object moves first?",
)


def _choices(rng: np.random.Generator, pool: tuple[str, ...], k: int) -> list[str]:
    return [str(x) for x in rng.choice(pool, size=k, replace=False)]


def _fill(template: str, rng: np.random.Generator) -> str:
    colour, shape, obj = (str(rng.choice(p)) for p in (COLOURS, SHAPES, OBJECTS))
    a = int(rng.integers(1, 16))
    return template.format(
        colour=colour, shape=shape, object=obj, object2=str(rng.choice(OBJECTS)), place=str(rng.choice(PLACES)),
        digit=int(rng.integers(10)), digit2=int(rng.integers(10)), count=int(rng.integers(1, 12)),
        a=a, b=a + int(rng.integers(1, 4)), answer=str(rng.choice(["A", "B", "C", "D", "3", "7", colour, "left"])),
    )


def _question(rng: np.random.Generator) -> str:
    question = _fill(str(rng.choice(QUESTIONS)), rng)
    if rng.random() < 0.5:
        pool = COLOURS if rng.random() < 0.5 else tuple("0123456789") + ("left", "right", "frames 3-5", "frames 9-12")
        options = _choices(rng, pool, int(rng.integers(2, 5)))
        question += "\nOptions:\n" + "\n".join(f"({'ABCD'[i]}) {o}" for i, o in enumerate(options))
    return question


def _family_questions(per_family: int) -> Iterator[str]:
    """Questions of every registered synthetic family (none if the families are absent)."""
    try:
        from pxr_env.tasks.synthetic import FAMILIES
    except ImportError:
        return
    for name in sorted(FAMILIES):
        source = FAMILIES[name]()
        rng = np.random.default_rng(0)
        for _ in range(per_family):
            yield source.sample(rng).question_with_choices()


def _error_messages() -> Iterator[str]:
    """The operations' and the parser's real error messages."""
    image = np.zeros((64, 64, 3), np.uint8)
    bad_crops = [([0.5, 0.5, 0.51, 0.51], 1, 0.0), ([0.1, 0.2, 0.3], 1, 0.1), ([0.5, 0.1, 0.2, 0.3], 1, 0.1),
                 ([-1, 0, 10, 10], 1, 0.1), ([0.1, 0.1, 0.5, 0.5], 3, 0.1), (["a", 0, 1, 1], 1, 0.1)]
    for bbox, target, padding in bad_crops:
        try:
            ops.crop_image([image], [(64, 64)], bbox, target, (784, 784), padding=padding)
        except ops.OpError as err:
            yield f"Execution error: {err}"
    frames = np.zeros((16, 8, 8, 3), np.uint8)
    for frames_arg, target in ((None, [1]), (frames, [0, 17]), (frames, list(range(1, 10))), (frames, [])):
        try:
            ops.select_frames(frames_arg, target, (64, 64 * 64))
        except ops.OpError as err:
            yield f"Execution error: {err}"
    for turn in ("<tool_call>\n{oops}\n</tool_call>", "<tool_call></tool_call>", '<tool_call>\n{"name": 3}\n</tool_call>',
                 '<tool_call>\n{"name": "crop_image"}\n</tool_call>', "I think so.", "\\boxed{}"):
        error = parse_turn(turn).error
        if error:
            yield f"Execution error: {error}"


def _assistant_turn(rng: np.random.Generator, boxes: BoxVocab) -> str:
    text = " ".join(_fill(str(rng.choice(REASONING)), rng) for _ in range(int(rng.integers(1, 3))))
    kind = rng.random()
    if kind < 0.45:
        if rng.random() < 0.5:
            bbox = json.loads(f"[{boxes.texts[int(rng.integers(len(boxes)))]}]")
        elif rng.random() < 0.5:
            x, y = rng.random(2) * 0.8
            bbox = [round(float(v), 2) for v in (x, y, x + rng.random() * 0.2, y + rng.random() * 0.2)]
        else:
            x, y = (int(v) for v in rng.integers(0, 1500, 2))
            bbox = [x, y, x + int(rng.integers(30, 400)), y + int(rng.integers(30, 400))]
        call = format_tool_call("crop_image", {"bbox_2d": bbox, "target_image": int(rng.integers(1, 4))})
    elif kind < 0.6:
        start = int(rng.integers(1, 14))
        call = format_tool_call("select_frames", {"target_frames": list(range(start, start + int(rng.integers(1, 5))))})
    else:
        answer = str(rng.choice(["A", "B", "C", "D", str(int(rng.integers(0, 30))), str(rng.choice(COLOURS)), "left", "right"]))
        call = format_answer(answer)
    return f"{text}\n{call}"


def corpus(seed: int = 0, episodes: int = 6000, system_copies: int = 200, family_questions: int = 150) -> Iterator[str]:
    """The training text, one document at a time (deterministic for a given seed)."""
    rng = np.random.default_rng(seed)
    boxes = BoxVocab()
    prompt = system_prompt()
    for _ in range(system_copies):
        yield prompt
    yield from _error_messages()
    yield from _family_questions(family_questions)
    for _ in range(episodes):
        parts = ["user", _question(rng), "assistant", _assistant_turn(rng, boxes)]
        k = int(rng.integers(2, 6))
        w, h = (28 * int(v) for v in rng.integers(6, 10, 2))
        parts += ["user", f"Here is the cropped image (image {k}, {w}x{h} px):"]
        frames = sorted(int(v) for v in rng.choice(np.arange(1, 17), size=int(rng.integers(1, 5)), replace=False))
        parts += [f"Here are frames {', '.join(map(str, frames))} of the video at full resolution:",
                  "The video has 16 frames, numbered 1 to 16, shown above in order.", "assistant",
                  _assistant_turn(rng, boxes)]
        yield "\n".join(parts)


def _segments(texts: Iterator[str], added: tuple[str, ...]) -> Iterator[str]:
    """Split documents around added tokens, which BPE must not learn merges for."""
    splitter = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    for text in texts:
        for piece in splitter.split(text):
            if piece:
                yield piece


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0, boxes: BoxVocab | None = None):
    """Train the BPE and wrap it as a `PreTrainedTokenizerFast` with the chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    boxes = boxes or BoxVocab()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    added = SPECIAL_TOKENS + TOOL_TAGS + boxes.texts
    tok.train_from_iterator(_segments(corpus(seed), added), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAGS + boxes.texts])
    return _wrap(tok)


def _wrap(backend: Any) -> Any:
    """A `tokenizers.Tokenizer` as the tiny model's `PreTrainedTokenizerFast` (padding, end of turn, chat template)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left",
        clean_up_tokenization_spaces=False, chat_template=QWEN2_VL_CHAT_TEMPLATE, model_max_length=8192,
    )


def with_box_tokens(tokenizer: Any, boxes: BoxVocab) -> Any:
    """`tokenizer` (a tiny-model tokenizer) with its box tokens replaced by those of `boxes`.

    The BPE part, the special tokens and the tool tags keep their ids; the new box tokens
    come last, as `agents.vlm.tiny.tiny_config` expects. A model with another pointer grid
    or other box sizes uses the shipped BPE this way, without retraining it.
    """
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    kept = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS + TOOL_TAGS]
    if len(kept) != len(SPECIAL_TOKENS + TOOL_TAGS):
        raise ValueError("not a tiny-model tokenizer: its special tokens and tool tags are not all there")
    first = max(t["id"] for t in kept) + 1
    data["added_tokens"] = kept + [
        {"id": first + i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": False} for i, text in enumerate(boxes.texts)]
    return _wrap(Tokenizer.from_str(json.dumps(data)))


def with_frame_tokens(tokenizer: Any, windows: FrameWindows) -> Any:
    """A copy of `tokenizer` (a tiny-model tokenizer ending in its box tokens) with the
    frame-window tokens of `windows` appended after them, as `agents.vlm.tiny.tiny_config` expects."""
    from tokenizers import AddedToken

    present = set(tokenizer.get_vocab())
    if any(text in present for text in windows.texts):
        raise ValueError("the tokenizer already holds frame-window tokens")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in windows.texts])
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR, help="folder to write the tokenizer files to")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="size of the BPE part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.vocab_size, args.seed)
    tokenizer.save_pretrained(args.out)
    prompt_tokens = len(tokenizer(system_prompt())["input_ids"])
    print(f"wrote {args.out}: {len(tokenizer)} tokens; the system prompt is {prompt_tokens} tokens")


if __name__ == "__main__":
    main()
