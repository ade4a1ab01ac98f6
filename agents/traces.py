r"""Warm-start (SFT) traces: scripted episodes around each sample's evidence, played through the env.

The published warm start (shared REFERENCE section 4) trains on templated traces built
around a known evidence region, not on free distillation. A pixel-space trace describes
the whole input, zooms in on the evidence (or selects the evidence frames), analyses the
result and answers in ``\boxed{}`` (a choice question with its option's text, e.g.
``\boxed{H}`` or ``\boxed{left}``, which the scorer accepts); self-correction traces
first make a deliberate mistake and then recover. Kinds and their default shares:

=====================  ======  ==============================================================
kind                   share   turns (the crop / frame calls in order)
=====================  ======  ==============================================================
``image/single``       30%     correct crop, answer
``image/recrop-once``  20%     **missed crop**, correct crop, answer
``image/recrop-twice`` 20%     **missed crop**, **missed crop**, correct crop, answer
``image/zoom-in``      30%     over-large crop holding the evidence, tighter crop, answer
``video/single``       90%     evidence frames, answer
``video/reselect``     10%     **frames that miss the evidence**, evidence frames, answer
``text``               (n)     answer at once from the whole input, no operation
=====================  ======  ==============================================================

Every trace is *played*: the scripted turns go through a real `PixelQAEnv`
(``reset(options={"sample_id": ...})`` then ``step(turn)``), so the tool outputs recorded
in the `Conversation` (crop images, "Here is the cropped image ..." texts) are exactly
the environment's. The env must score the final answer correct (answers are gold) and
every operation must do what the script meant (the env's ``crop_hit`` / ``frames_hit``);
a sample on which a kind cannot be built or verified is set aside and another one is
drawn, and each trace records in ``info["rejected"]`` why samples were set aside before
it (`summarize` adds them up).

Loss masking: ``Trace.trained`` holds one flag per assistant turn. The turns that make a
deliberate mistake (the **bold** calls above, with their text) are not trained; the
recovery after them is; tool outputs are never trained (`Trace.segments` marks them
False). `agents.vlm.encoding.encode_segments` turns the segments into token ids and a
loss mask.

Boxes (fractions of the cropped image, written with `TraceOptions.box_decimals`):
the correct box is the evidence box with a small random jitter whose padded crop (the
crop op adds the env's `crop_padding` on every side) holds the whole evidence; a missed box has about the
correct box's size, and its padded crop holds neither the evidence centre nor more
than `TraceOptions.miss_max_overlap` of the evidence area; the over-large box holds the
evidence and its padded crop is 2-4 times the side of the correct one's (at least twice
its area). A `TraceOptions.box_writer` can snap boxes to what a model can write (the
tiny model's box tokens); every check runs on the boxes as written.

Run as a script to write a trace folder::

    python -m agents.traces --out runs/traces --tasks zoom-read --n-pixel 5500 --n-text 2000
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from agents.vlm.chat import IM_END, ChatFormat, Conversation, render_messages
from pxr_env import ops
from pxr_env.actions import format_answer, format_tool_call
from pxr_env.env import PixelQAEnv
from pxr_env.scoring import match_choice
from pxr_env.tasks import CHOICE_LETTERS, Sample, TaskSource, make_task_source

Box = tuple[float, float, float, float]
BoxWriter = Callable[[Box], Sequence[float]]

IMAGE_KINDS = ("image/single", "image/recrop-once", "image/recrop-twice", "image/zoom-in")
VIDEO_KINDS = ("video/single", "video/reselect")
TEXT_KIND = "text"
TRACE_KINDS = IMAGE_KINDS + VIDEO_KINDS + (TEXT_KIND,)

TRACES_FILE = "traces.jsonl"
IMAGES_DIR = "images"


# ------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class TraceMix:
    """Shares of the pixel-space trace kinds (REFERENCE section 4)."""

    image: Mapping[str, float] = field(default_factory=lambda: {
        "image/single": 0.3, "image/recrop-once": 0.2, "image/recrop-twice": 0.2, "image/zoom-in": 0.3})
    """Shares of the image kinds among image traces."""
    video: Mapping[str, float] = field(default_factory=lambda: {"video/single": 0.9, "video/reselect": 0.1})
    """Shares of the video kinds among video traces."""
    video_share: float | None = None
    """Share of video traces among pixel traces. A number gives exact counts per kind (largest
    remainder); None follows the task source: each pixel trace takes the modality of its
    first sample, and the kinds within a modality keep close to the shares (see `_plan`)."""

    def __post_init__(self) -> None:
        for name, shares, kinds in (("image", self.image, IMAGE_KINDS), ("video", self.video, VIDEO_KINDS)):
            bad = sorted(set(shares) - set(kinds))
            if bad:
                raise ValueError(f"TraceMix.{name} has unknown kinds {bad}; use {kinds}")
            values = np.array(list(shares.values()), dtype=np.float64)
            if not shares or not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
                raise ValueError(f"TraceMix.{name} shares must be non-negative with a positive sum, got {dict(shares)}")
        if self.video_share is not None and not 0.0 <= self.video_share <= 1.0:
            raise ValueError(f"TraceMix.video_share must be None or in [0, 1], got {self.video_share}")

    def shares(self, modality: str) -> dict[str, float]:
        """Normalized shares of `modality` ("image" or "video")."""
        raw = self.image if modality == "image" else self.video
        total = sum(raw.values())
        return {kind: value / total for kind, value in raw.items()}


@dataclass(frozen=True)
class TraceOptions:
    """How traces are drawn: boxes, checks and the environment they are played in."""

    box_decimals: int = 2
    """Decimals of the box fractions as written (2 or 3)."""
    box_writer: BoxWriter | None = None
    """Maps a box (fractions x1, y1, x2, y2) to the four numbers written, e.g. the tiny model's
    grid snapping; None keeps the box. The numbers are written with `box_decimals` decimals
    and must be fractions below 1 once rounded; the writer must be
    picklable (a module-level function or a `functools.partial`) when ``workers > 1``."""
    jitter: tuple[float, float] = (-0.1, 0.3)
    """Outward move of each edge of the correct box, as a range of fractions of the evidence side."""
    zoom_out: tuple[float, float] = (2.0, 4.0)
    """Side of the over-large crop as a multiple of the correct crop's side (both padded)."""
    miss_max_overlap: float = 0.25
    """Largest share of the evidence area a missed crop may show."""
    refine_on_crop: bool = True
    """Zoom-in traces crop the tighter box from the first crop (image 2) rather than from the original."""
    text_answerable_only: bool = True
    """Textual traces only on samples not marked ``answerable_without_ops=False``."""
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Arguments of the `PixelQAEnv` the traces are played in (e.g. ``pixel_bounds``)."""
    max_draws: int = 200
    """Samples a trace may set aside before synthesis gives up with an error."""
    chat_format: ChatFormat = field(default_factory=ChatFormat)
    """Layout of the played conversations (system prompt, question before the image); the
    policy trained on the traces must use the same one."""

    def __post_init__(self) -> None:
        if self.box_decimals not in (2, 3):
            raise ValueError(f"box_decimals must be 2 or 3, got {self.box_decimals}")
        lo, hi = self.jitter
        if not -0.5 < lo <= hi:
            raise ValueError(f"jitter must be a range (lo, hi) with -0.5 < lo <= hi, got {self.jitter}")
        lo, hi = self.zoom_out
        if not 1.0 < lo <= hi:
            raise ValueError(f"zoom_out must be a range (lo, hi) with 1 < lo <= hi, got {self.zoom_out}")
        if not 0.0 <= self.miss_max_overlap < 1.0:
            raise ValueError(f"miss_max_overlap must be in [0, 1), got {self.miss_max_overlap}")
        if self.max_draws < 1:
            raise ValueError(f"max_draws must be at least 1, got {self.max_draws}")
        fixed = sorted({"tasks", "action_mode"} & set(self.env_kwargs))
        if fixed:
            raise ValueError(f"env_kwargs may not set {fixed}: traces play the task source given to "
                             "synthesize_traces in text mode")


# ------------------------------------------------------------------ the trace record

@dataclass
class Trace:
    """One played warm-start episode.

    `conversation` holds the messages and images exactly as played; `trained` has one flag
    per assistant turn (False on the deliberate mistakes); `correct` is the env's verdict on
    the final answer; `info` is JSON (family, boxes or frames written, draws, rejections,
    and ``crop_box``: the pixels of the original the last crop showed, None without one; for a
    count sample also ``image_size`` and ``counted_centres``, the pixels of the original at the
    centre of each thing counted, which train the count head's tokens).
    """

    sample_id: str
    kind: str
    conversation: Conversation
    trained: list[bool]
    correct: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[np.ndarray]:
        """The conversation's images in order (the original or frames, then each tool output)."""
        return self.conversation.images

    def segments(self) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive pieces with a "trained on" flag.

        Pieces: the prompt (system and first user message, up to ``<|im_start|>assistant\\n``),
        then each assistant turn with its ``<|im_end|>`` (flag from `trained`), then each tool
        output as a continuation (``\\n<|im_start|>user\\n...<|im_start|>assistant\\n``, never
        trained). Their concatenation plus ``"\\n"`` is ``conversation.render(False)``.
        """
        return conversation_segments(self.conversation.messages, self.trained, self.conversation.vision_ids)

    def reading(self) -> tuple[list[tuple[str, bool]], list[np.ndarray]]:
        """The trace reduced to reading what it last looked at: segments and images of a one-turn conversation.

        The system message, the first user message with the trace's last observation in place of
        the original (the final crop, the selected frames of a video trace, or the original image
        or frames of a textual trace), and the final assistant turn, the only piece trained. A
        reading stage of the SFT trains on these, so that the loss is the answer alone
        (`agents.sft.SFTStage.reading`).
        """
        messages = self.conversation.messages
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        shown = next(m for m in reversed(messages) if m["role"] == "user")
        n_images = sum(item.get("type") == "image" for item in shown["content"])
        question = [dict(item) for item in messages[first]["content"] if item.get("type") != "image"]
        at = next(i for i, item in enumerate(messages[first]["content"]) if item.get("type") == "image")
        question[at:at] = [{"type": "image"}] * n_images
        reduced = [*messages[:first], {**messages[first], "content": question}, messages[-1]]
        return (conversation_segments(reduced, [self.trained[-1]], self.conversation.vision_ids),
                self.images[len(self.images) - n_images:])

    def pointing(self) -> tuple[list[tuple[str, bool]], list[np.ndarray]]:
        """The trace reduced to its first decision: segments and images of a one-turn conversation.

        The system message, the first user message with the original image or frames, and the
        first assistant turn (the first operation, or the answer of a textual trace), the only
        piece trained. Traces whose first turn is a deliberate mistake are refused. A pointing
        stage of the SFT trains on these, so that a step spends its compute on the first
        crop alone (`agents.sft.SFTStage.pointing`).
        """
        messages = self.conversation.messages
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        if not self.trained[0]:
            raise ValueError(f"{self.sample_id}: the first turn of a {self.kind} trace is a deliberate mistake, "
                             f"not a pointing item")
        n_images = sum(item.get("type") == "image" for item in messages[first]["content"])
        return conversation_segments(messages[:first + 2], [True], self.conversation.vision_ids), self.images[:n_images]


def conversation_segments(messages: Sequence[Mapping[str, Any]], trained: Sequence[bool],
                          vision_ids: bool = False) -> list[tuple[str, bool]]:
    """Split rendered `messages` into (text, trained) pieces at every assistant turn (see `Trace.segments`);
    `vision_ids`: images labelled ``Picture k: `` (`ChatFormat.vision_ids`)."""
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if n_assistant != len(trained):
        raise ValueError(f"{len(trained)} trained flags for {n_assistant} assistant turns")
    out: list[tuple[str, bool]] = []
    done, turn = "", 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            text = "".join(item["text"] for item in message["content"] if "text" in item) + IM_END
            out.append((text, bool(trained[turn])))
            done += text
            turn += 1
        elif message["role"] == "user" and i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            rendered = render_messages(messages[: i + 1], add_generation_prompt=True, add_vision_id=vision_ids)
            if not rendered.startswith(done):
                raise ValueError(f"message {i} does not continue the rendered conversation")
            out.append((rendered[len(done):], False))
            done = rendered
    return out


# ------------------------------------------------------------------ templates

_DESCRIBE_IMAGE = {
    "zoom-read": ("The image shows many coloured shapes, and some of them carry small marks.",
                  "I see a busy picture with shapes of many colours and sizes.",
                  "There are lots of shapes in this image; the marks on them are tiny."),
    "count": ("The image shows many objects of different shapes, colours and sizes.",
              "I see a crowded picture with lots of shapes.",
              "There are many objects in this image, some of them very small."),
    "chart": ("The image is a page with a chart, a table or panels of text.",
              "I see a document with titles, labels and small printed values.",
              "This is a chart or a poster; the printed values are small."),
}
_DESCRIBE_GENERIC = ("The image is large and its details are small.",
                     "I see the whole image, but the fine details are hard to make out.",
                     "Let me look at the image as a whole first.")
_DESCRIBE_VIDEO = ("The video has {n} frames, shown small.",
                   "I see {n} small frames of the video.",
                   "The {n} frames of the video are shown at a small size.")
_LOCATE = ("What the question asks about is {where}.",
           "The part that matters is {where}.",
           "I think it is {where}.")
_ZOOM = ("It is too small to see clearly, so I will zoom in.",
         "Let me zoom in to see it better.",
         "I will crop that region to look closer.")
_MISS_INTENT = ("Let me zoom in on the region {where}.",
                "I will crop the region {where}.",
                "Let me look closer at the part {where}.")
_MISSED = ("The crop does not show what the question asks about.",
           "This region does not contain it.",
           "I cannot find it in this crop.")
_RETRY = ("It must be {where}. Let me crop there.",
          "Let me look {where} instead.",
          "I will crop {where}.")
_STILL_SMALL = ("The crop contains it, but it is still too small to read.",
                "I can see the right area now, but the detail is still small.",
                "It is in this crop, yet still hard to make out.")
_FURTHER = ("Let me zoom in further.",
            "I will crop a tighter region.",
            "Let me look even closer.")
_SEEN = ("Now I can see it clearly.",
         "The crop shows the detail clearly.",
         "In the cropped image the detail is easy to read.")
_SEEN_FRAMES = ("The selected frames show it clearly.",
                "Now I can see what happens in these frames.",
                "These frames show the moment the question asks about.")
_FRAMES_INTENT = ("The question is about {when}. Let me look at frames {frames} closely.",
                  "It happens {when}, so I will select frames {frames}.",
                  "Let me see frames {frames}, {when}, at full resolution.")
_FRAMES_MISS_INTENT = ("Let me look at frames {frames} closely.",
                       "I will select frames {frames}.",
                       "Let me see frames {frames} at full resolution.")
_FRAMES_MISSED = ("These frames do not show it.",
                  "What the question asks about is not in these frames.",
                  "I cannot see it in these frames.")
_FRAMES_RETRY = ("It must be {when}. Let me select frames {frames}.",
                 "Let me try frames {frames} instead, {when}.",
                 "I will look at frames {frames}, {when}.")
_VISIBLE = ("The detail is large enough to see without zooming.",
            "I can answer from the whole image.",
            "It is clear enough at this size.")
_VISIBLE_VIDEO = ("I can answer from these frames.",
                  "The frames are clear enough to answer.",
                  "What happens is visible at this size.")
_ANSWER = ("The answer is {phrase}.",
           "It shows {phrase}.",
           "So the answer is {phrase}.")


def _pick(rng: np.random.Generator, templates: Sequence[str], **values: Any) -> str:
    return templates[int(rng.integers(len(templates)))].format(**values)


def _where(cx: float, cy: float) -> str:
    """A simple place phrase for the point (cx, cy), fractions of the image."""
    row = ("top", "middle", "bottom")[min(2, int(cy * 3))]
    col = ("left", "centre", "right")[min(2, int(cx * 3))]
    if row == "middle" and col == "centre":
        return "near the centre of the image"
    if row == "middle":
        return f"on the {col} side of the image"
    if col == "centre":
        return f"at the {row} of the image"
    return f"in the {row} {col} part of the image"


def _direction(dx: float, dy: float) -> str:
    """Which way to move by (dx, dy), fractions of the image: e.g. "a bit further up and to the left"."""
    vertical = "" if abs(dy) < 0.05 else ("down" if dy > 0 else "up")
    horizontal = "" if abs(dx) < 0.05 else ("to the right" if dx > 0 else "to the left")
    return "a bit further " + (" and ".join(p for p in (vertical, horizontal) if p) or "in")


def _when(frames: Sequence[int], num_frames: int) -> str:
    centre = (sum(frames) / len(frames) - 0.5) / max(1, num_frames)
    phrases = ("at the beginning of the video", "in the middle of the video", "near the end of the video")
    return phrases[min(2, int(centre * 3))]


def _answer_text(sample: Sample) -> str:
    """What a trace answers: the gold answer, but for a choice question the option's text
    wherever the scorer reads that text back as the same option (`match_choice`). A tiny
    model names what it saw in minutes, while copying the letter of the matching option out
    of the prompt did not emerge in 150 steps of 64 (docs/results.md)."""
    answer = sample.answers[0]
    if sample.answer_type != "choice":
        return answer
    text = sample.choices[CHOICE_LETTERS.index(answer)]
    return text if match_choice(text, sample.choices) == answer else answer


def _describe(sample: Sample, rng: np.random.Generator, num_frames: int) -> str:
    if sample.is_video:
        return _pick(rng, _DESCRIBE_VIDEO, n=num_frames)
    return _pick(rng, _DESCRIBE_IMAGE.get(sample.family, _DESCRIBE_GENERIC))


def _final(sample: Sample, rng: np.random.Generator, lead: Sequence[str]) -> str:
    answer = _answer_text(sample)
    return f"{_pick(rng, lead)} {_pick(rng, _ANSWER, phrase=answer)}\n{format_answer(answer)}"


# ------------------------------------------------------------------ geometry

class _Infeasible(Exception):
    """The kind cannot be built on this sample; the message is the reason counted."""


def _crop_call(box: Sequence[float], target: int) -> str:
    """A crop_image call; numbers spelled as ``json.dumps`` spells them (``0.5``), like the tiny model's box tokens."""
    return format_tool_call("crop_image", {"bbox_2d": [float(v) for v in box], "target_image": target})


def _frames_call(frames: Sequence[int]) -> str:
    return format_tool_call("select_frames", {"target_frames": [int(f) for f in frames]})


class _Geometry:
    """Box drawing and checking for one image sample, in pixels of the original image."""

    def __init__(self, sample: Sample, options: TraceOptions, rng: np.random.Generator,
                 padding: float, min_side: int) -> None:
        self.padding, self.min_side = padding, min_side
        height, width = sample.load_image().shape[:2]
        self.size = (width, height)
        self.evidence = tuple(float(v) for v in sample.evidence_box)
        ex1, ey1, ex2, ey2 = self.evidence
        if not (0 <= ex1 < ex2 <= width and 0 <= ey1 < ey2 <= height):
            raise _Infeasible("evidence box outside the image")
        self.options, self.rng = options, rng
        self.top = 1.0 - 10.0 ** -options.box_decimals

    def write(self, box: Box) -> Box:
        """The box as written: through the box writer (or rounding), checked to be fractions."""
        x1, y1, x2, y2 = (min(max(v, 0.0), self.top) for v in box)
        numbers = (x1, y1, x2, y2) if self.options.box_writer is None else self.options.box_writer((x1, y1, x2, y2))
        written = [round(float(v), self.options.box_decimals) for v in numbers]
        if len(written) != 4 or not all(0.0 <= v < 1.0 for v in written):
            raise ValueError(f"the box writer must return four fractions in [0, 1), got {written} for {box}")
        if written[2] <= written[0] or written[3] <= written[1]:
            raise _Infeasible("written box is empty")
        return tuple(written)

    def crop_pixels(self, written: Box, region: Box) -> Box:
        """The padded crop of `written` (fractions of `region`, a pixel box of the original) in original pixels."""
        rx1, ry1, rx2, ry2 = region
        left, top, right, bottom = ops.crop_box_pixels(written, (int(rx2 - rx1), int(ry2 - ry1)), self.padding)
        if right - left <= self.min_side or bottom - top <= self.min_side:
            raise _Infeasible("crop too small")
        return (rx1 + left, ry1 + top, rx1 + right, ry1 + bottom)

    def holds_evidence(self, crop: Box) -> bool:
        ex1, ey1, ex2, ey2 = self.evidence
        return crop[0] <= ex1 and crop[1] <= ey1 and crop[2] >= ex2 and crop[3] >= ey2

    def misses_evidence(self, crop: Box) -> bool:
        ex1, ey1, ex2, ey2 = self.evidence
        cx, cy = (ex1 + ex2) / 2, (ey1 + ey2) / 2
        if crop[0] <= cx <= crop[2] and crop[1] <= cy <= crop[3]:
            return False
        ix = max(0.0, min(crop[2], ex2) - max(crop[0], ex1))
        iy = max(0.0, min(crop[3], ey2) - max(crop[1], ey1))
        return ix * iy <= self.options.miss_max_overlap * (ex2 - ex1) * (ey2 - ey1)

    def fractions(self, region: Box) -> Box:
        """The evidence as fractions of `region` (a pixel box of the original)."""
        rx1, ry1, rx2, ry2 = region
        ex1, ey1, ex2, ey2 = self.evidence
        w, h = rx2 - rx1, ry2 - ry1
        return ((ex1 - rx1) / w, (ey1 - ry1) / h, (ex2 - rx1) / w, (ey2 - ry1) / h)

    def correct(self, region: Box, tries: int = 20) -> tuple[Box, Box]:
        """(written box, padded crop in original pixels) holding the evidence, drawn in `region`."""
        fx1, fy1, fx2, fy2 = self.fractions(region)
        lo, hi = self.options.jitter
        for _ in range(tries):
            mx, my = (fx2 - fx1), (fy2 - fy1)
            out = self.rng.uniform(lo, hi, size=4)
            box = (fx1 - out[0] * mx, fy1 - out[1] * my, fx2 + out[2] * mx, fy2 + out[3] * my)
            try:
                written = self.write(box)
                crop = self.crop_pixels(written, region)
            except _Infeasible:
                continue
            if self.holds_evidence(crop):
                return written, crop
        raise _Infeasible("no correct box holds the evidence as written")

    def miss(self, like: Box, avoid: Sequence[Box], tries: int = 100) -> tuple[Box, Box]:
        """A box about the size of `like` (fractions) whose crop misses the evidence and overlaps no crop in `avoid`."""
        whole = (0.0, 0.0, float(self.size[0]), float(self.size[1]))
        w0, h0 = like[2] - like[0], like[3] - like[1]
        for _ in range(tries):
            w, h = (min(0.9, s * self.rng.uniform(0.8, 1.25)) for s in (w0, h0))
            x1, y1 = self.rng.uniform(0.0, self.top - w), self.rng.uniform(0.0, self.top - h)
            try:
                written = self.write((x1, y1, x1 + w, y1 + h))
                crop = self.crop_pixels(written, whole)
            except _Infeasible:
                continue
            if self.misses_evidence(crop) and all(ops.box_iou(crop, other) < 0.3 for other in avoid):
                return written, crop
        raise _Infeasible("no room for a box that misses the evidence")

    def over_large(self, tight_crop: Box, tries: int = 20) -> tuple[Box, Box]:
        """A box whose crop holds the evidence and is 2-4x the side of `tight_crop` (at least twice its area)."""
        width, height = self.size
        fx1, fy1, fx2, fy2 = self.fractions((0.0, 0.0, float(width), float(height)))
        tw, th = (tight_crop[2] - tight_crop[0]) / width, (tight_crop[3] - tight_crop[1]) / height
        tight_area = (tight_crop[2] - tight_crop[0]) * (tight_crop[3] - tight_crop[1])
        for _ in range(tries):
            scale = self.rng.uniform(*self.options.zoom_out)
            # Side of the box before the crop's padding on each side.
            bw = max(fx2 - fx1, min(1.0, scale * tw) - 2 * self.padding)
            bh = max(fy2 - fy1, min(1.0, scale * th) - 2 * self.padding)
            lo_x, lo_y = max(0.0, fx2 - bw), max(0.0, fy2 - bh)
            x1 = self.rng.uniform(lo_x, max(lo_x, min(fx1, self.top - bw)))
            y1 = self.rng.uniform(lo_y, max(lo_y, min(fy1, self.top - bh)))
            try:
                written = self.write((x1, y1, x1 + bw, y1 + bh))
                crop = self.crop_pixels(written, (0.0, 0.0, float(width), float(height)))
            except _Infeasible:
                continue
            area = (crop[2] - crop[0]) * (crop[3] - crop[1])
            if self.holds_evidence(crop) and area >= 2.0 * tight_area:
                return written, crop
        raise _Infeasible("no room to zoom out around the evidence")


def _spread(frames: Sequence[int], k: int) -> list[int]:
    """At most `k` of `frames` (sorted), evenly spread."""
    frames = sorted(set(frames))
    if len(frames) <= k:
        return frames
    return [frames[int(round(i * (len(frames) - 1) / (k - 1)))] for i in range(k)]


def _missed_frames(evidence: Sequence[int], num_frames: int, length: int, rng: np.random.Generator) -> list[int]:
    """A run of up to `length` consecutive frames that holds no evidence frame."""
    runs, start = [], None
    for f in range(1, num_frames + 2):
        free = f <= num_frames and f not in evidence
        if free and start is None:
            start = f
        elif not free and start is not None:
            runs.append((start, f - 1))
            start = None
    if not runs:
        raise _Infeasible("every frame is an evidence frame")
    longest = max(b - a + 1 for a, b in runs)
    n = min(length, longest)
    starts = [s for a, b in runs for s in range(a, b - n + 2)]
    first = starts[int(rng.integers(len(starts)))]
    return list(range(first, first + n))


# ------------------------------------------------------------------ scripts

@dataclass
class _Step:
    """One scripted assistant turn and what the env must report after it."""

    text: str
    trained: bool
    expect: str  # "hit", "miss" (operations) or "answer"


def _script(kind: str, sample: Sample, env: PixelQAEnv, num_frames: int, options: TraceOptions,
            rng: np.random.Generator) -> tuple[list[_Step], dict[str, Any]]:
    """The assistant turns of `kind` on `sample` (under `env`'s crop rules), and the JSON record of the boxes or frames written."""
    describe = _describe(sample, rng, num_frames)
    if kind == TEXT_KIND:
        lead = _VISIBLE_VIDEO if sample.is_video else _VISIBLE
        return [_Step(f"{describe} {_final(sample, rng, lead)}", True, "answer")], {}
    if sample.is_video:
        return _video_script(kind, sample, num_frames, describe, rng)
    if sample.evidence_box is None:
        raise _Infeasible("no evidence box")
    geo = _Geometry(sample, options, rng, env.crop_padding, env.min_crop_side)
    width, height = geo.size
    whole = (0.0, 0.0, float(width), float(height))
    ex1, ey1, ex2, ey2 = geo.evidence
    where = _where((ex1 + ex2) / 2 / width, (ey1 + ey2) / 2 / height)
    locate = _pick(rng, _LOCATE, where=where)
    correct, correct_crop = geo.correct(whole)
    steps: list[_Step] = []
    record: dict[str, Any] = {"evidence": [round(v, 4) for v in geo.fractions(whole)]}
    if kind == "image/single":
        steps.append(_Step(f"{describe} {locate} {_pick(rng, _ZOOM)}\n{_crop_call(correct, 1)}", True, "hit"))
        record["boxes"] = [list(correct)]
    elif kind in ("image/recrop-once", "image/recrop-twice"):
        misses: list[Box] = []
        crops: list[Box] = []
        for _ in range(1 if kind == "image/recrop-once" else 2):
            box, crop = geo.miss(correct, crops)
            misses.append(box)
            crops.append(crop)
        first = _where((crops[0][0] + crops[0][2]) / 2 / width, (crops[0][1] + crops[0][3]) / 2 / height)
        steps.append(_Step(f"{describe} {_pick(rng, _MISS_INTENT, where=first)}\n{_crop_call(misses[0], 1)}",
                           False, "miss"))
        if len(misses) == 2:
            second = _where((crops[1][0] + crops[1][2]) / 2 / width, (crops[1][1] + crops[1][3]) / 2 / height)
            steps.append(_Step(f"{_pick(rng, _MISSED)} {_pick(rng, _RETRY, where=second)}\n"
                               f"{_crop_call(misses[1], 1)}", False, "miss"))
        last = crops[-1]
        toward = where if _where((last[0] + last[2]) / 2 / width, (last[1] + last[3]) / 2 / height) != where else \
            _direction((ex1 + ex2 - last[0] - last[2]) / 2 / width, (ey1 + ey2 - last[1] - last[3]) / 2 / height)
        steps.append(_Step(f"{_pick(rng, _MISSED)} {_pick(rng, _RETRY, where=toward)}\n{_crop_call(correct, 1)}",
                           True, "hit"))
        record["boxes"] = [list(b) for b in misses] + [list(correct)]
    elif kind == "image/zoom-in":
        big, big_crop = geo.over_large(correct_crop)
        steps.append(_Step(f"{describe} {locate} {_pick(rng, _ZOOM)}\n{_crop_call(big, 1)}", True, "hit"))
        if options.refine_on_crop:
            tight, tight_crop = geo.correct(big_crop)
            target = 2
        else:
            tight, tight_crop, target = correct, correct_crop, 1
        big_area = (big_crop[2] - big_crop[0]) * (big_crop[3] - big_crop[1])
        if (tight_crop[2] - tight_crop[0]) * (tight_crop[3] - tight_crop[1]) * 2.0 > big_area:
            raise _Infeasible("no room to zoom out around the evidence")
        steps.append(_Step(f"{_pick(rng, _STILL_SMALL)} {_pick(rng, _FURTHER)}\n{_crop_call(tight, target)}",
                           True, "hit"))
        record["boxes"] = [list(big), list(tight)]
        record["targets"] = [1, target]
    else:
        raise ValueError(f"unknown image trace kind {kind!r}; image kinds are {IMAGE_KINDS}")
    steps.append(_Step(_final(sample, rng, _SEEN), True, "answer"))
    return steps, record


def _video_script(kind: str, sample: Sample, num_frames: int, describe: str,
                  rng: np.random.Generator) -> tuple[list[_Step], dict[str, Any]]:
    evidence = [f for f in sample.evidence_frames if 1 <= f <= num_frames]
    if not evidence:
        raise _Infeasible("no evidence frames")
    frames = _spread(evidence, ops.MAX_FRAMES_PER_CALL)
    when = _when(frames, num_frames)
    listed = ", ".join(map(str, frames))
    steps: list[_Step] = []
    record: dict[str, Any] = {"evidence_frames": sorted(evidence)}
    if kind == "video/single":
        steps.append(_Step(f"{describe} {_pick(rng, _FRAMES_INTENT, when=when, frames=listed)}\n{_frames_call(frames)}",
                           True, "hit"))
        record["frames"] = [frames]
    elif kind == "video/reselect":
        missed = _missed_frames(evidence, num_frames, len(frames), rng)
        steps.append(_Step(f"{describe} {_pick(rng, _FRAMES_MISS_INTENT, frames=', '.join(map(str, missed)))}\n"
                           f"{_frames_call(missed)}", False, "miss"))
        steps.append(_Step(f"{_pick(rng, _FRAMES_MISSED)} {_pick(rng, _FRAMES_RETRY, when=when, frames=listed)}\n"
                           f"{_frames_call(frames)}", True, "hit"))
        record["frames"] = [missed, frames]
    else:
        raise ValueError(f"unknown video trace kind {kind!r}; video kinds are {VIDEO_KINDS}")
    steps.append(_Step(_final(sample, rng, _SEEN_FRAMES), True, "answer"))
    return steps, record


# ------------------------------------------------------------------ playing

class _HeldSource:
    """Serves the sample just drawn to the env by id, so it is not generated twice."""

    def __init__(self, source: TaskSource) -> None:
        self.source = source
        self.name = source.name
        self.held: Sample | None = None

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.source.sample(rng)

    def get(self, sample_id: str) -> Sample:
        if self.held is not None and self.held.sample_id == sample_id:
            return self.held
        return self.source.get(sample_id)


def _play(env: PixelQAEnv, sample: Sample, kind: str, options: TraceOptions,
          rng: np.random.Generator) -> Trace:
    """Play `kind` on `sample` through `env`; raises `_Infeasible` when a step disagrees with the script."""
    obs, info = env.reset(options={"sample_id": sample.sample_id})
    num_frames = int(info["num_frames"])
    steps, record = _script(kind, sample, env, num_frames, options, rng)
    conversation = options.chat_format.conversation()
    conversation.add_observation(obs)
    terminated = truncated = False
    for i, step in enumerate(steps):
        conversation.add_assistant(step.text + IM_END)
        obs, _, terminated, truncated, info = env.step(step.text)
        if info["action_error"] is not None:
            raise _Infeasible(f"env error: {info['action_error']}")
        if step.expect == "answer":
            break
        hit = info["frames_hit"] if sample.is_video else info["crop_hit"]
        if hit != (step.expect == "hit"):
            raise _Infeasible(f"env disagrees: step {i} should {step.expect}")
        conversation.add_observation(obs)
    if not terminated or truncated:
        raise _Infeasible("episode did not end at the answer")
    if not info["correct"]:
        raise _Infeasible("env scored the gold answer wrong")
    record.update(family=sample.family, n_visual_ops=int(info["n_visual_ops"]), crop_box=info["crop_box"])
    if sample.family == "count" and "objects" in sample.meta:
        height, width = sample.load_image().shape[:2]
        record.update(image_size=[width, height], counted_centres=[
            [(o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2]
            for o in sample.meta["objects"] if o["counted"]])
    return Trace(sample_id=sample.sample_id, kind=kind, conversation=conversation,
                 trained=[s.trained for s in steps], correct=bool(info["correct"]), info=record)


@dataclass(frozen=True)
class _Job:
    index: int
    kinds: tuple[str, ...]
    """One kind, or (image kind, video kind): the first sample's modality picks one."""


def _run_job(job: _Job, env: PixelQAEnv, held: _HeldSource, options: TraceOptions, seed: int) -> Trace:
    rng = np.random.default_rng([seed, job.index])
    kind, rejected = job.kinds[0] if len(job.kinds) == 1 else None, Counter()
    for draw in range(1, options.max_draws + 1):
        sample = held.source.sample(rng)
        modality = "video" if sample.is_video else "image"
        if kind is None:
            kind = job.kinds[1] if sample.is_video else job.kinds[0]
        if kind == TEXT_KIND:
            if options.text_answerable_only and sample.answerable_without_ops is False:
                rejected["needs operations"] += 1
                continue
        elif not kind.startswith(modality):
            rejected[f"not {kind.split('/')[0]}"] += 1
            continue
        held.held = sample
        try:
            trace = _play(env, sample, kind, options, rng)
        except _Infeasible as why:
            rejected[str(why)] += 1
            continue
        trace.info.update(draws=draw, rejected=dict(rejected))
        return trace
    raise RuntimeError(
        f"trace {job.index} ({kind or ' or '.join(job.kinds)}): no usable sample in {options.max_draws} draws from "
        f"{held.source.name!r}; reasons: {dict(rejected)}. Check that the task source gives samples of "
        "that modality with evidence, or adjust TraceMix / TraceOptions.")


def _run_chunk(task_source: TaskSource, jobs: Sequence[_Job], options: TraceOptions, seed: int) -> list[Trace]:
    held = _HeldSource(task_source)
    env = PixelQAEnv(tasks=held, action_mode="text", **dict(options.env_kwargs))
    try:
        return [_run_job(job, env, held, options, seed) for job in jobs]
    finally:
        env.close()


def play_traces(task_source: Any, sample_ids: Sequence[str], image_kind: str = "image/single",
                video_kind: str = "video/single", options: TraceOptions | None = None,
                seed: int = 0) -> list[Trace]:
    """Play one trace on each of `sample_ids` (`image_kind` or `video_kind` by modality, either of
    them the textual kind ``"text"``: the answer at once), in order.

    For measuring on chosen (e.g. held-out) samples; the samples the script cannot play (no
    evidence, the env disagrees) are left out, so the result may be shorter than `sample_ids`.
    """
    if image_kind not in IMAGE_KINDS + (TEXT_KIND,) or video_kind not in VIDEO_KINDS + (TEXT_KIND,):
        raise ValueError(f"image_kind must be one of {IMAGE_KINDS} and video_kind one of {VIDEO_KINDS} "
                         f"(or either {TEXT_KIND!r}), got {image_kind!r}, {video_kind!r}")
    options = options or TraceOptions()
    held = _HeldSource(make_task_source(task_source))
    env = PixelQAEnv(tasks=held, action_mode="text", **dict(options.env_kwargs))
    traces = []
    try:
        for i, sample_id in enumerate(sample_ids):
            held.held = sample = held.source.get(sample_id)
            kind = video_kind if sample.is_video else image_kind
            try:
                traces.append(_play(env, sample, kind, options, np.random.default_rng([seed, i])))
            except _Infeasible:
                continue
    finally:
        env.close()
    return traces


def _quota(n: int, shares: Mapping[str, float]) -> list[str]:
    """`n` kinds in the proportions `shares` (largest remainder), in the order of `shares`."""
    names = list(shares)
    total = sum(shares.values())
    exact = np.array([shares[k] / total * n for k in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [k for k, c in zip(names, counts) for _ in range(c)]


def _plan(n_pixel: int, n_text: int, mix: TraceMix, seed: int) -> list[_Job]:
    """The jobs in a seeded order (each job's randomness depends only on its index).

    With an explicit video share every pixel job has its kind, in exact proportions. Without
    one each pixel job holds an image kind and a video kind, both from exact proportions over
    all pixel jobs, so that the kinds of the jobs that turn out to be images (or videos) keep
    close to the shares.
    """
    rng = np.random.default_rng(seed)
    if mix.video_share is None:
        image = [_quota(n_pixel, mix.shares("image"))[i] for i in rng.permutation(n_pixel)]
        video = [_quota(n_pixel, mix.shares("video"))[i] for i in rng.permutation(n_pixel)]
        kinds = [(a, b) for a, b in zip(image, video)]
    else:
        n_video = int(round(n_pixel * mix.video_share))
        kinds = [(k,) for k in _quota(n_pixel - n_video, mix.shares("image")) + _quota(n_video, mix.shares("video"))]
    kinds += [(TEXT_KIND,)] * n_text
    return [_Job(index=int(i), kinds=kinds[i]) for i in rng.permutation(len(kinds))]


def synthesize_traces(task_source: Any, n_pixel: int, n_text: int, mix: TraceMix | None = None, seed: int = 0,
                      options: TraceOptions | None = None, workers: int = 1, chunk_size: int = 32,
                      progress: bool = True) -> list[Trace]:
    """Play `n_pixel` pixel-space and `n_text` textual warm-start traces on samples of `task_source`.

    `task_source` is anything `make_task_source` takes (a family name, a dict of folders,
    a `TaskSource`). The result is in a seeded order and does not depend on `workers` or
    `chunk_size`: trace ``i`` draws its samples and words from ``default_rng([seed, i])``.
    With ``workers > 1`` chunks run in processes (the task source and `options` must pickle).
    """
    return list(iter_traces(task_source, n_pixel, n_text, mix, seed, options, workers, chunk_size, progress))


def iter_traces(task_source: Any, n_pixel: int, n_text: int, mix: TraceMix | None = None, seed: int = 0,
                options: TraceOptions | None = None, workers: int = 1, chunk_size: int = 32,
                progress: bool = True) -> Iterator[Trace]:
    """The traces of `synthesize_traces`, in the same order, one chunk at a time.

    At most ``2 * workers`` chunks are held at once, so that a consumer that keeps less than a
    trace (an encoded item, say) holds a few chunks' images rather than all of them: 3,000
    video traces of 16 frames are several GiB as arrays.
    """
    if n_pixel < 0 or n_text < 0 or n_pixel + n_text == 0:
        raise ValueError(f"need n_pixel >= 0 and n_text >= 0, not both 0; got {n_pixel}, {n_text}")
    if workers < 1 or chunk_size < 1:
        raise ValueError(f"workers and chunk_size must be at least 1, got {workers}, {chunk_size}")
    source = make_task_source(task_source)
    mix = mix or TraceMix()
    options = options or TraceOptions()
    jobs = _plan(n_pixel, n_text, mix, seed)
    chunks = [jobs[i:i + chunk_size] for i in range(0, len(jobs), chunk_size)]
    with tqdm(total=len(jobs), desc="traces", unit="trace", disable=not progress) as bar:
        if workers == 1:
            for chunk in chunks:
                yield from _run_chunk(source, chunk, options, seed)
                bar.update(len(chunk))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append((len(chunk), pool.submit(_run_chunk, source, chunk, options, seed)))
                if len(pending) >= 2 * workers:
                    yield from _collect(pending.popleft(), bar)
            while pending:
                yield from _collect(pending.popleft(), bar)


def _collect(entry: tuple[int, Any], bar: tqdm) -> list[Trace]:
    """The traces of one finished chunk (size, future), counted on `bar`."""
    size, future = entry
    traces = future.result()
    bar.update(size)
    return traces


def summarize(traces: Sequence[Trace]) -> dict[str, Any]:
    """Counts and shares per kind, correctness, and the reasons samples were set aside."""
    kinds = Counter(t.kind for t in traces)
    rejected: Counter = Counter()
    for t in traces:
        rejected.update(t.info.get("rejected", {}))
    pixel = {k: v for k, v in kinds.items() if k != TEXT_KIND}
    shares = {}
    for modality in ("image", "video"):
        n = sum(v for k, v in pixel.items() if k.startswith(modality))
        shares.update({k: v / n for k, v in pixel.items() if k.startswith(modality)})
    return {"n": len(traces), "kinds": dict(sorted(kinds.items())), "shares": dict(sorted(shares.items())),
            "correct": sum(t.correct for t in traces), "rejected": dict(rejected.most_common())}


# ------------------------------------------------------------------ storage

def save_traces(traces: Sequence[Trace], directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``traces.jsonl`` (one trace a line) and ``images/<trace>_<image>.png`` under `directory`."""
    from PIL import Image

    directory = Path(directory)
    path = directory / TRACES_FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another directory")
    (directory / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i, trace in enumerate(traces):
            names = []
            for k, image in enumerate(trace.images):
                name = f"{IMAGES_DIR}/{i:06d}_{k:02d}.png"
                Image.fromarray(image).save(directory / name)
                names.append(name)
            record = {"sample_id": trace.sample_id, "kind": trace.kind, "correct": trace.correct,
                      "trained": trace.trained, "messages": trace.conversation.messages, "images": names,
                      "vision_ids": trace.conversation.vision_ids, "info": trace.info}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def load_traces(directory: str | Path) -> list[Trace]:
    """Read what `save_traces` wrote (JSON and PNG only; nothing is unpickled)."""
    from PIL import Image

    directory = Path(directory)
    path = directory / TRACES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TRACES_FILE} in {directory}: write one with save_traces")
    traces = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            record = json.loads(line)
            messages = record["messages"]
            n_items = sum(1 for m in messages for item in m["content"] if item.get("type") == "image")
            if n_items != len(record["images"]):
                raise ValueError(f"{path} line {number}: {n_items} image items but {len(record['images'])} image files")
            conversation = Conversation(system=messages[0]["content"][0]["text"],
                                        vision_ids=bool(record.get("vision_ids", False)))
            conversation.messages = messages
            conversation.images = [np.asarray(Image.open(directory / name).convert("RGB")) for name in record["images"]]
            traces.append(Trace(sample_id=record["sample_id"], kind=record["kind"], conversation=conversation,
                                trained=[bool(t) for t in record["trained"]], correct=bool(record["correct"]),
                                info=record["info"]))
    return traces


# ------------------------------------------------------------------ command line

def main(argv: Sequence[str] | None = None) -> None:
    """Synthesize a trace folder from the command line and print its summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write traces.jsonl and images/ into")
    parser.add_argument("--tasks", default="zoom-read", help="a synthetic family name or 'synthetic'")
    parser.add_argument("--n-pixel", type=int, default=5500)
    parser.add_argument("--n-text", type=int, default=2000)
    parser.add_argument("--video-share", type=float, default=None)
    parser.add_argument("--box-decimals", type=int, default=2, choices=(2, 3))
    parser.add_argument("--pixel-bounds", default="tiny", help="the env's pixel preset: tiny, train or eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    options = TraceOptions(box_decimals=args.box_decimals, env_kwargs={"pixel_bounds": args.pixel_bounds})
    traces = synthesize_traces(args.tasks, args.n_pixel, args.n_text, TraceMix(video_share=args.video_share),
                               seed=args.seed, options=options, workers=args.workers)
    save_traces(traces, args.out, overwrite=args.overwrite)
    print(json.dumps(summarize(traces), indent=1))


if __name__ == "__main__":
    main()
