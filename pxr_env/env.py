"""`PixelQAEnv`: visual question answering played as an episode of visual operations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from pxr_env import ops
from pxr_env.actions import parse_turn
from pxr_env.images import MediaError
from pxr_env.scoring import score_answer
from pxr_env.spaces import ImageList, UnicodeText
from pxr_env.tasks import CHOICE_LETTERS, Sample, make_task_source
from pxr_env.tools import TOOL_NAMES, TOOL_SCHEMAS

ACTION_MODES = ("text", "structured")
KIND_CROP, KIND_FRAMES, KIND_ANSWER = 0, 1, 2
_TOOL_ARGUMENTS = {
    t["function"]["name"]: (set(t["function"]["parameters"]["properties"]), set(t["function"]["parameters"]["required"]))
    for t in TOOL_SCHEMAS
}


@dataclass
class _Episode:
    """Everything one episode accumulates; rebuilt at each reset."""

    sample: Sample
    sources: list[np.ndarray] = field(default_factory=list)
    shown_sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes_in_original: list[tuple[float, float, float, float]] = field(default_factory=list)
    frames: np.ndarray | None = None
    requested_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    selected_frames: list[int] = field(default_factory=list)
    last_selection: list[int] = field(default_factory=list)
    n_visual_ops: int = 0
    n_op_errors: int = 0
    n_tool_calls: int = 0
    n_turn_errors: int = 0
    images_in_context: int = 0
    last_op_failed: bool = False
    latest_view: np.ndarray | None = None
    log: list[str] = field(default_factory=list)


class PixelQAEnv(gym.Env):
    """Visual question answering as an episode of visual operations and a final answer.

    Each episode is one question about one image or video, drawn from `tasks`. Each step
    the policy either calls a visual operation, whose result is the next observation, or
    gives its final answer, which ends the episode and is scored.

    **Action space.** ``action_mode="text"`` (language-model policies): one model turn, a
    `UnicodeText` string. A ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    is executed; otherwise a final answer (``\\boxed{...}``, then the fallbacks documented
    in `pxr_env.actions`) ends the episode; a turn with neither is an error.
    ``action_mode="structured"`` (SB3 and other numeric policies): a `MultiDiscrete`
    vector ``[kind, x1, y1, x2, y2, target_image, first_frame, frame_count, answer]``:
    kind 0 crops the box ``(x1, y1, x2, y2) / box_grid`` of image ``target_image + 1``,
    kind 1 selects frames ``first_frame + 1 .. first_frame + frame_count + 1``, kind 2
    answers with choice letter number ``answer`` (choice questions) or the integer
    ``answer`` (counting questions). Both modes run the same operations (`pxr_env.ops`).

    **Observation space.** Text mode: ``{"text": str, "images": tuple of (H, W, 3) uint8}``.
    At reset the images (the original image smart-resized to ``pixel_bounds.image``, or the
    video's frames at ``pixel_bounds.video``) come before the text (the question with
    lettered options); after an operation the text ("Here is the cropped image ...") comes
    before its image(s); an error is text only, ``"Execution error: <why>"``. Structured
    mode: ``{"view": the newest image, "overview": the initial view (a frame mosaic for
    videos)}`` as ``(view_size, view_size, 3)`` uint8, ``"question"`` as UTF-8 bytes
    (``question_bytes`` long, zero-padded) and ``"status"`` = [operations used / max_ops,
    images / max_images, last action failed, is video].

    **Rewards.** The task reward at the answer: 1 if correct, else 0 (ANLS in [0, 1] for
    ``answer_type == "anls"``; see `pxr_env.scoring`). With ``zero_reward_on_unfixed_error``
    (the released code's rule) a correct answer scores 0 when the last operation failed
    and no later operation succeeded. Reward shaping (curiosity, efficiency) lives in
    `wrappers`.

    **Episode end.** Terminated at the final answer. Truncated with reward 0 when the
    policy requests an operation after ``max_ops`` executed ones, or one that would bring
    more than ``max_images`` images into the context (the original image counts as one,
    the initial video view as none); the registered ids also cap the number of turns.

    **Info.** Reset: ``sample_id``, ``family``, ``answer_type``, ``choices``,
    ``num_frames``, ``is_video`` (never the answer). Every step: ``action_error`` (None or
    why the action failed) and ``operation`` (the executed tool or None). At the end:
    ``correct``, ``score``, ``answer`` (the parsed answer), ``gold_answers``,
    ``n_visual_ops`` (executed), ``n_op_errors``, ``n_tool_calls`` (requested, errors
    included), ``used_pixel_reasoning`` (these counts are in every step's info, so they
    survive a turn limit imposed by a wrapper), ``crop_iou`` (IoU of the last requested crop box
    with the evidence box, None without a crop or evidence), ``crop_hit`` (the last crop
    contains the whole evidence box), ``crop_area`` (share of the original image the last
    requested crop box covers, None without a crop), ``crop_box`` (the pixels of the original the
    last crop shows, padding included, as ``[left, top, right, bottom]``; None without a crop),
    ``frames_hit`` (a frame of the last selection is an evidence frame: the frames the answer is
    read from, as ``crop_hit`` is about the last crop; a policy that selects again and again
    does not score by covering the clip).

    **Vector envs.** Both modes run in `gymnasium.vector.SyncVectorEnv` and
    `AsyncVectorEnv`; text mode needs ``AsyncVectorEnv(..., shared_memory=False)``, since
    images of varying size cannot live in shared memory.

    **Arguments.** `tasks`: see `pxr_env.tasks.make_task_source`. `action_mode`: "text" or
    "structured". `pixel_bounds`: "tiny" (default, small models on a CPU), "train" or
    "eval" (the released bounds for Qwen2.5-VL), a `PixelBounds`, or a mapping that
    changes a preset (`ops.PixelBounds.resolve`; it can be saved in env settings). `max_ops`,
    `max_images`: the limits. `max_turn_chars`: longer text turns are an error.
    `zero_reward_on_unfixed_error`: see Rewards. `crop_padding` (0.1, a fraction of
    the side added around every crop box) and `min_crop_side` (28 px): the released crop
    rules; a smaller padding zooms further. `view_size`, `question_bytes`,
    `box_grid`, `max_answer`: structured-mode sizes. `on_media_error`: "raise" (the
    error names the file and sample) or "skip" (draw another sample, up to 10 times).
    """

    metadata = {"render_modes": ["rgb_array", "ansi"], "render_fps": 1}

    def __init__(self, tasks: Any = "synthetic", action_mode: str = "text",
                 pixel_bounds: str | ops.PixelBounds | Mapping[str, Any] = "tiny", max_ops: int = 4, max_images: int = 16,
                 max_turn_chars: int = 65_536, zero_reward_on_unfixed_error: bool = False,
                 view_size: int = 224, question_bytes: int = 256, box_grid: int = 20, max_answer: int = 26,
                 num_frames: int = 16, crop_padding: float = ops.CROP_PADDING, min_crop_side: int = ops.MIN_CROP_SIDE,
                 on_media_error: str = "raise", render_mode: str | None = None) -> None:
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if max_ops < 0 or max_images < 1 or max_turn_chars < 1:
            raise ValueError("need max_ops >= 0, max_images >= 1 and max_turn_chars >= 1")
        if view_size < 36 or question_bytes < 1 or box_grid < 2 or max_answer < 2 or num_frames < 1:
            raise ValueError("need view_size >= 36, question_bytes >= 1, box_grid >= 2, max_answer >= 2, num_frames >= 1")
        if not 0.0 <= crop_padding < 0.5 or min_crop_side < 0:
            raise ValueError(f"need 0 <= crop_padding < 0.5 (a fraction of the side) and min_crop_side >= 0, "
                             f"got {crop_padding}, {min_crop_side}")
        if on_media_error not in ("raise", "skip"):
            raise ValueError(f"on_media_error must be 'raise' or 'skip', got {on_media_error!r}")
        self.task_source = make_task_source(tasks)
        self.bounds = ops.PixelBounds.resolve(pixel_bounds)
        self.action_mode = action_mode
        self.max_ops, self.max_images, self.max_turn_chars = max_ops, max_images, max_turn_chars
        self.zero_reward_on_unfixed_error = zero_reward_on_unfixed_error
        self.view_size, self.question_bytes, self.box_grid = view_size, question_bytes, box_grid
        self.max_answer, self.num_frames, self.on_media_error = max_answer, num_frames, on_media_error
        self.crop_padding, self.min_crop_side = crop_padding, min_crop_side
        self.render_mode = render_mode
        if action_mode == "text":
            largest = max(b[1] for b in (self.bounds.image, self.bounds.crop, self.bounds.frame, self.bounds.video))
            max_side = int(math.sqrt(largest * ops.MAX_ASPECT_RATIO)) + ops.PATCH
            self.action_space = UnicodeText(max_length=max_turn_chars)
            self.observation_space = spaces.Dict({
                "text": UnicodeText(max_length=1 << 20),
                "images": ImageList(max_images=max(max_images, num_frames), max_side=max_side, min_side=ops.PATCH),
            })
        else:
            side = (view_size, view_size, 3)
            self.action_space = spaces.MultiDiscrete(
                [3, box_grid + 1, box_grid + 1, box_grid + 1, box_grid + 1, max_images, num_frames,
                 ops.MAX_FRAMES_PER_CALL, max_answer + 1])
            self.observation_space = spaces.Dict({
                "view": spaces.Box(0, 255, side, np.uint8),
                "overview": spaces.Box(0, 255, side, np.uint8),
                "question": spaces.Box(0, 255, (question_bytes,), np.uint8),
                "status": spaces.Box(0.0, 1.0, (4,), np.float32),
            })
        self._episode: _Episode | None = None
        self._overview: np.ndarray | None = None
        self._question: np.ndarray | None = None

    # ------------------------------------------------------------------ reset
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        options = options or {}
        sample_id = options.get("sample_id")
        tries = 1 if sample_id is not None or self.on_media_error == "raise" else 10
        for attempt in range(tries):
            sample = self.task_source.get(sample_id) if sample_id is not None else self.task_source.sample(self.np_random)
            try:
                episode, images, text = self._start(sample)
                break
            except MediaError:
                if attempt == tries - 1:
                    raise
                gym.logger.warn(f"skipping sample {sample.sample_id!r}: its media cannot be read")
        self._episode = episode
        episode.log.append(f"[user] {text}")
        info = {"sample_id": sample.sample_id, "family": sample.family, "answer_type": sample.answer_type,
                "choices": list(sample.choices), "num_frames": 0 if episode.frames is None else len(episode.frames),
                "is_video": sample.is_video, "action_error": None, "operation": None}
        if self.action_mode == "structured":
            self._overview = self._fit(images[0]) if not sample.is_video else self._mosaic(images)
            self._question = self._encode_question(text)
        return self._observation(text, images), info

    def _start(self, sample: Sample) -> tuple[_Episode, tuple[np.ndarray, ...], str]:
        episode = _Episode(sample=sample)
        if sample.is_video:
            frames = sample.load_frames()
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
                raise MediaError(f"sample {sample.sample_id!r}: video frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
            episode.frames = frames
            images = tuple(ops.smart_resize(f, self.bounds.video) for f in frames)
            text = (f"The video has {len(frames)} frames, numbered 1 to {len(frames)}, shown above in order.\n"
                    f"{sample.question_with_choices()}")
        else:
            image = sample.load_image()
            view = ops.smart_resize(image, self.bounds.image)
            episode.sources.append(image)
            episode.shown_sizes.append((view.shape[1], view.shape[0]))
            episode.boxes_in_original.append((0.0, 0.0, float(image.shape[1]), float(image.shape[0])))
            episode.images_in_context = 1
            images = (view,)
            text = sample.question_with_choices()
        episode.latest_view = images[-1]
        return episode, images, text

    # ------------------------------------------------------------------- step
    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        if self._episode is None:
            raise RuntimeError("call reset() before step()")
        if self.action_mode == "text":
            kind, payload, error = self._decode_text(action)
        else:
            kind, payload, error = self._decode_structured(action)
        episode = self._episode
        episode.log.append(f"[policy] {payload if kind == 'text' else (action if isinstance(action, str) else list(np.asarray(action)))}"[:2000])
        if error is not None:
            if kind == "op":
                episode.n_tool_calls += 1
                episode.n_op_errors += 1
                episode.last_op_failed = True
            else:
                episode.n_turn_errors += 1
            return self._error(error)
        if kind == "answer":
            return self._finish(payload)
        return self._operate(*payload)

    def _decode_text(self, action: Any) -> tuple[str, Any, str | None]:
        if not isinstance(action, str):
            return "text", repr(action)[:200], f"an action must be a string (one model turn), got {type(action).__name__}"
        if len(action) > self.max_turn_chars:
            return "text", action[:200], f"the turn is too long: {len(action)} characters, the limit is {self.max_turn_chars}"
        parsed = parse_turn(action, max_chars=self.max_turn_chars)
        if parsed.tool_call is not None:
            name, arguments = parsed.tool_call.name, parsed.tool_call.arguments
            if name not in TOOL_NAMES:
                return "op", (name, arguments), f"unknown tool {name!r}; available tools: {', '.join(TOOL_NAMES)}"
            allowed, required = _TOOL_ARGUMENTS[name]
            missing, extra = sorted(required - set(arguments)), sorted(set(arguments) - allowed)
            if missing:
                return "op", (name, arguments), f"{name} is missing argument(s) {missing}"
            if extra:
                return "op", (name, arguments), f"{name} got unexpected argument(s) {extra}; it takes {sorted(allowed)}"
            return "op", (name, arguments), None
        if parsed.answer is not None:
            return "answer", parsed.answer, None
        return "text", action[:200], parsed.error

    def _decode_structured(self, action: Any) -> tuple[str, Any, str | None]:
        try:
            a = np.asarray(action)
            valid = a.shape == self.action_space.shape and np.issubdtype(a.dtype, np.number) and np.all(np.isfinite(a))
        except (TypeError, ValueError):
            valid = False
        if not valid or not self.action_space.contains(a.astype(self.action_space.dtype)):
            return "text", repr(action)[:200], f"a structured action must be a vector in {self.action_space}"
        kind, x1, y1, x2, y2, target, first, count, answer = (int(v) for v in a)
        if kind == KIND_CROP:
            episode = self._episode
            index = target + 1
            width, height = episode.shown_sizes[index - 1] if index <= len(episode.shown_sizes) else (1, 1)
            box = [x1 * width / self.box_grid, y1 * height / self.box_grid,
                   x2 * width / self.box_grid, y2 * height / self.box_grid]
            return "op", ("crop_image", {"bbox_2d": box, "target_image": index}), None
        if kind == KIND_FRAMES:
            return "op", ("select_frames", {"target_frames": list(range(first + 1, first + count + 2))}), None
        sample = self._episode.sample
        if sample.answer_type == "choice":
            if answer >= len(sample.choices):
                return "answer", None, f"answer {answer} is out of range: there are {len(sample.choices)} choices"
            return "answer", CHOICE_LETTERS[answer], None
        if sample.answer_type == "number":
            return "answer", str(answer), None
        return "answer", None, "this question needs a free-text answer; use action_mode='text'"

    def _operate(self, name: str, arguments: dict[str, Any]) -> tuple[Any, float, bool, bool, dict]:
        episode = self._episode
        episode.n_tool_calls += 1
        if episode.n_visual_ops >= self.max_ops:
            return self._truncate(f"the limit of {self.max_ops} operations is reached")
        try:
            if name == "crop_image":
                if episode.frames is not None:
                    raise ops.OpError("crop_image works only on an image; this question is about a video (use select_frames)")
                target = arguments["target_image"]
                crop, view, box = ops.crop_image(episode.sources, episode.shown_sizes, arguments["bbox_2d"], target,
                                                 self.bounds.crop, self.crop_padding, self.min_crop_side)
                if episode.images_in_context + 1 > self.max_images:
                    return self._truncate(f"the limit of {self.max_images} images is reached")
                self._record_crop(int(target), box, arguments["bbox_2d"])
                episode.sources.append(crop)
                episode.shown_sizes.append((view.shape[1], view.shape[0]))
                images = (view,)
                text = f"Here is the cropped image (image {len(episode.sources)}, {view.shape[1]}x{view.shape[0]} px):"
            else:
                indices, images_list = ops.select_frames(episode.frames, arguments["target_frames"], self.bounds.frame)
                if episode.images_in_context + len(indices) > self.max_images:
                    return self._truncate(f"the limit of {self.max_images} images is reached")
                episode.selected_frames.extend(indices)
                episode.last_selection = list(indices)
                images = tuple(images_list)
                text = f"Here are frames {', '.join(map(str, indices))} of the video at full resolution:"
        except ops.OpError as exc:
            episode.n_op_errors += 1
            episode.last_op_failed = True
            return self._error(str(exc))
        episode.n_visual_ops += 1
        episode.images_in_context += len(images)
        episode.last_op_failed = False
        episode.latest_view = images[-1]
        episode.log.append(f"[env] {text} <{len(images)} image(s)>")
        info = {"action_error": None, "operation": name, **self._stats()}
        return self._observation(text, images), 0.0, False, False, info

    def _record_crop(self, target: int, box: tuple[int, int, int, int], bbox_2d: Any) -> None:
        """Map the crop (and the requested, unpadded box) into original-image pixels."""
        episode = self._episode
        ox1, oy1, ox2, oy2 = episode.boxes_in_original[target - 1]
        sh, sw = episode.sources[target - 1].shape[:2]
        sx, sy = (ox2 - ox1) / sw, (oy2 - oy1) / sh
        left, top, right, bottom = box
        episode.boxes_in_original.append((ox1 + left * sx, oy1 + top * sy, ox1 + right * sx, oy1 + bottom * sy))
        fx1, fy1, fx2, fy2 = ops.normalize_bbox(bbox_2d, episode.shown_sizes[target - 1])
        episode.requested_boxes.append((ox1 + fx1 * (ox2 - ox1), oy1 + fy1 * (oy2 - oy1),
                                        ox1 + min(fx2, 1.0) * (ox2 - ox1), oy1 + min(fy2, 1.0) * (oy2 - oy1)))

    def _error(self, why: str) -> tuple[Any, float, bool, bool, dict]:
        text = f"Execution error: {why}"
        self._episode.log.append(f"[env] {text}")
        return self._observation(text, ()), 0.0, False, False, {"action_error": why, "operation": None, **self._stats()}

    def _truncate(self, why: str) -> tuple[Any, float, bool, bool, dict]:
        text = f"Execution error: {why}; the episode ends without an answer."
        self._episode.log.append(f"[env] {text}")
        info = {"action_error": why, "operation": None, **self._final_info(None, 0.0)}
        return self._observation("", ()), 0.0, False, True, info

    def _finish(self, answer: str) -> tuple[Any, float, bool, bool, dict]:
        episode = self._episode
        sample = episode.sample
        score = score_answer(answer, sample.answers, sample.answer_type, sample.choices)
        if self.zero_reward_on_unfixed_error and episode.last_op_failed:
            score = 0.0
        episode.log.append(f"[env] answer {answer!r} scored {score:.3f} (gold {list(sample.answers)})")
        info = {"action_error": None, "operation": None, **self._final_info(answer, score)}
        return self._observation("", ()), float(score), True, False, info

    def _final_info(self, answer: str | None, score: float) -> dict[str, Any]:
        sample = self._episode.sample
        return {**self._stats(), "correct": score >= 0.5, "score": score, "answer": answer,
                "gold_answers": list(sample.answers)}

    def _stats(self) -> dict[str, Any]:
        """Running episode statistics, in every step's info (so a turn limit imposed by a
        wrapper still leaves them in the last info)."""
        episode = self._episode
        sample = episode.sample
        crop_iou = crop_hit = frames_hit = crop_area = crop_box = None
        if episode.requested_boxes:
            rx1, ry1, rx2, ry2 = episode.requested_boxes[-1]
            _, _, width, height = episode.boxes_in_original[0]
            crop_area = (rx2 - rx1) * (ry2 - ry1) / (width * height)
            crop_box = list(episode.boxes_in_original[-1])
        if sample.evidence_box is not None and episode.requested_boxes:
            crop_iou = ops.box_iou(episode.requested_boxes[-1], sample.evidence_box)
            cx1, cy1, cx2, cy2 = episode.boxes_in_original[-1]
            ex1, ey1, ex2, ey2 = sample.evidence_box
            crop_hit = cx1 <= ex1 and cy1 <= ey1 and cx2 >= ex2 and cy2 >= ey2
        if sample.evidence_frames and episode.last_selection:
            frames_hit = bool(set(sample.evidence_frames) & set(episode.last_selection))
        return {
            "sample_id": sample.sample_id, "family": sample.family, "is_video": sample.is_video,
            "n_visual_ops": episode.n_visual_ops, "n_op_errors": episode.n_op_errors,
            "n_tool_calls": episode.n_tool_calls, "n_turn_errors": episode.n_turn_errors,
            "used_pixel_reasoning": episode.n_visual_ops > 0,
            "crop_iou": crop_iou, "crop_hit": crop_hit, "crop_area": crop_area, "crop_box": crop_box,
            "frames_hit": frames_hit,
        }

    # ----------------------------------------------------------- observations
    def _observation(self, text: str, images: tuple[np.ndarray, ...]) -> Any:
        if self.action_mode == "text":
            return {"text": text, "images": images}
        episode = self._episode
        status = np.array([
            min(1.0, episode.n_visual_ops / max(1, self.max_ops)),
            min(1.0, episode.images_in_context / self.max_images),
            float(text.startswith("Execution error")),
            float(episode.sample.is_video),
        ], dtype=np.float32)
        view = self._fit(episode.latest_view) if episode.latest_view is not None else self._overview
        # fresh arrays every call: users keep what they are given
        return {"view": view.copy(), "overview": self._overview.copy(), "question": self._question.copy(), "status": status}

    def _fit(self, image: np.ndarray) -> np.ndarray:
        return ops.resize(image, self.view_size, self.view_size)

    def _mosaic(self, frames: tuple[np.ndarray, ...]) -> np.ndarray:
        side = math.ceil(math.sqrt(len(frames)))
        cell = self.view_size // side
        canvas = np.zeros((self.view_size, self.view_size, 3), np.uint8)
        for i, frame in enumerate(frames):
            r, c = divmod(i, side)
            canvas[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = ops.resize(frame, cell, cell)
        return canvas

    def _encode_question(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8")[: self.question_bytes], dtype=np.uint8)
        out = np.zeros(self.question_bytes, np.uint8)
        out[: len(data)] = data
        return out

    # ---------------------------------------------------------------- render
    def render(self) -> Any:
        if self.render_mode is None or self._episode is None:
            return None
        if self.render_mode == "ansi":
            return "\n".join(self._episode.log) + "\n"
        from pxr_env.render import render_episode

        episode = self._episode
        return render_episode(
            image=episode.sources[0] if episode.sources else None, frames=episode.frames,
            crop_boxes=episode.boxes_in_original[1:], selected_frames=episode.selected_frames,
            evidence_box=None, text=episode.log[-1] if episode.log else "",
        )
