"""MVBench: multiple-choice questions about videos, one ``json/<task>.json`` per task.

Each task file is a list of ``{"video", "question", "candidates", "answer"}`` (``answer``
is the text of the correct candidate), some with ``start`` / ``end`` in seconds. Videos
live under ``video/`` in a folder per source dataset (`MVBENCH_VIDEO_DIRS`, from the
benchmark's own evaluation code); the episodic-reasoning task stores each video as a
folder of JPEG frames at 3 frames per second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pxr_env.images import MediaError, resolve_inside
from pxr_env.tasks.base import DatasetSource, Sample
from pxr_env.tasks.loaders.common import (
    AnnotationError,
    as_record,
    collect,
    existing_dir,
    field,
    letter,
    read_json,
    string_list,
    text_field,
    time_window,
)
from pxr_env.tasks.loaders.frames import FrameFilesSample

MVBENCH_VIDEO_DIRS: dict[str, str] = {
    "action_sequence": "video/star/Charades_v1_480",
    "action_prediction": "video/star/Charades_v1_480",
    "action_antonym": "video/ssv2_video",
    "fine_grained_action": "video/Moments_in_Time_Raw/videos",
    "unexpected_action": "video/FunQA_test/test",
    "object_existence": "video/clevrer/video_validation",
    "object_interaction": "video/star/Charades_v1_480",
    "object_shuffle": "video/perception/videos",
    "moving_direction": "video/clevrer/video_validation",
    "action_localization": "video/sta/sta_video",
    "scene_transition": "video/scene_qa/video",
    "action_count": "video/perception/videos",
    "moving_count": "video/clevrer/video_validation",
    "moving_attribute": "video/clevrer/video_validation",
    "state_change": "video/perception/videos",
    "fine_grained_pose": "video/nturgbd",
    "character_order": "video/perception/videos",
    "egocentric_navigation": "video/vlnqa",
    "episodic_reasoning": "video/tvqa/frames_fps3_hq",
    "counterfactual_inference": "video/clevrer/video_validation",
}
FRAME_FOLDER_FPS = 3.0
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def _find_video(root: Path, folders: Sequence[str], video: Any) -> Path:
    """The first of ``<folder>/<video>`` that exists (a file, or a folder of frames)."""
    if not isinstance(video, str) or not video.strip():
        raise AnnotationError(f"field 'video' must be a relative path, got {video!r}")
    tried = []
    for folder in folders:
        path = resolve_inside(root, f"{folder}/{video.strip()}")
        if path.exists():
            return path
        tried.append(str(path))
    raise MediaError(f"video {video!r} is missing; looked for {tried}")


def _frame_files(folder: Path, window: tuple[float, float] | None) -> tuple[Path, ...]:
    """The frame images of a frame folder in name order, cut to `window` (3 fps)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
    if window is not None:
        start, end = window
        files = [p for i, p in enumerate(files) if start <= i / FRAME_FOLDER_FPS <= end]
    if not files:
        within = f" within {window[0]}-{window[1]} s" if window else ""
        raise MediaError(f"frame folder {str(folder)!r} has no frame images{within}")
    return tuple(files)


def load_mvbench(
    path: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    video_dirs: Mapping[str, str] | None = None,
    num_frames: int = 16,
    name: str = "mvbench",
    on_error: str = "raise",
) -> DatasetSource:
    """Load MVBench from its folder (``json/`` and ``video/``); family ``"mvbench"``.

    `tasks` picks task files by name (``"action_sequence"``, ...; default: all).
    A task's video is looked up in ``video_dirs[task]`` (default `MVBENCH_VIDEO_DIRS`;
    folders relative to `path`), then ``video/<task>/``, then ``video/``. Sample ids are
    ``"<name>/<task>/<index in the task file>"``; ``meta["task"]`` is the task name.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    root = existing_dir(path, "MVBench")
    json_dir = existing_dir(root / "json", "MVBench annotation (json/)")
    available = {p.stem: p for p in sorted(json_dir.glob("*.json"))}
    chosen = list(available) if tasks is None else list(tasks)
    unknown = [t for t in chosen if t not in available]
    if unknown:
        raise ValueError(f"MVBench tasks {unknown} have no file in {str(json_dir)!r}; available: {sorted(available)}")
    dirs = {**MVBENCH_VIDEO_DIRS, **(video_dirs or {})}

    def records() -> Any:
        for task in chosen:
            content = read_json(available[task])
            if not isinstance(content, list):
                raise AnnotationError(f"{available[task]} must hold a JSON list of records")
            for i, record in enumerate(content):
                yield f"{available[task]}, record {i}", (task, i, record)

    def build(item: tuple[str, int, Any]) -> Sample:
        task, index, record = item
        record = as_record(record)
        candidates = string_list(field(record, "candidates"), "candidates", min_len=2)
        answer = text_field(record, "answer").strip()
        if answer not in candidates:
            raise AnnotationError(f"answer {answer!r} is not one of the candidates {list(candidates)}")
        has_start, has_end = record.get("start") is not None, record.get("end") is not None
        if has_start != has_end:
            raise AnnotationError("fields 'start' and 'end' must be given together")
        window = time_window(record["start"], record["end"], "the clip") if has_start else None
        folders = [f for f in (dirs.get(task), f"video/{task}", "video") if f is not None]
        video = _find_video(root, folders, field(record, "video"))
        common = dict(
            sample_id=f"{name}/{task}/{index}",
            family="mvbench",
            question=text_field(record, "question"),
            answers=(letter(candidates.index(answer)),),
            answer_type="choice",
            choices=candidates,
            video=video,
            video_window=window,
            meta={"task": task},
        )
        if video.is_dir():
            frames = _frame_files(video, window)
            return FrameFilesSample(**common, num_frames=min(num_frames, len(frames)), frame_files=frames)
        return Sample(**common, num_frames=num_frames)

    return DatasetSource(name, collect(f"{name} ({root})", records(), build, on_error))
