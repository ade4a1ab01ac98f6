"""Builders of small benchmark folders in every supported format, for tests.

Each `make_*` function writes a few records into a fresh folder under the given
directory, using real photographs shipped inside scikit-image (resized to about 300 px)
and tiny videos panned across them, and returns the path to point a loader at. The
record contents are module constants so that tests can check what the loaders read.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PHOTO_SIDE = 300
VIDEO_SIZE = (48, 64)  # height, width
VIDEO_FRAMES = 24
VIDEO_FPS = 8.0


def photo(name: str, max_side: int = PHOTO_SIDE) -> np.ndarray:
    """A scikit-image sample photograph (``"astronaut"``, ``"coins"``, ...) as RGB uint8, longest side `max_side`."""
    import skimage.data

    array = getattr(skimage.data, name)()
    image = Image.fromarray(array).convert("RGB")
    scale = max_side / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    return np.asarray(image)


def save_image(array: np.ndarray, path: Path) -> Path:
    """Write `array` to `path` (format from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def panning_frames(name: str, count: int = VIDEO_FRAMES, size: tuple[int, int] = VIDEO_SIZE) -> np.ndarray:
    """`count` frames of a window sliding left to right across a photograph, ``(T, H, W, 3)``."""
    image = photo(name, max_side=160)
    h, w = size
    xs = np.linspace(0, image.shape[1] - w, count).round().astype(int)
    return np.stack([image[:h, x:x + w] for x in xs])


def write_clip(path: Path, name: str) -> Path:
    """A short panning video over photograph `name` (needs `pxr_env.video.write_video`)."""
    from pxr_env.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, panning_frames(name), fps=VIDEO_FPS)
    return path


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` pixels but whose data is a few bytes.

    Opening it is cheap; decoding it would fail, so a loader that refuses it by size
    before decoding is distinguishable from one that tries.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def write_mode_images(folder: Path) -> dict[str, Path]:
    """The coins photograph saved as grayscale, palette, RGBA and 16-bit grayscale PNGs."""
    gray = photo("coins", max_side=120)[:, :, 0]
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.dstack([np.stack([gray] * 3, axis=2), np.full(gray.shape, 128, np.uint8)])
    images = {
        "gray": Image.fromarray(gray),
        "palette": Image.fromarray(photo("chelsea", max_side=120)).convert("P", palette=Image.Palette.ADAPTIVE),
        "rgba": Image.fromarray(rgba),
        "gray16": Image.fromarray(gray.astype(np.uint16) * 257),
    }
    paths = {}
    for mode, image in images.items():
        paths[mode] = folder / f"{mode}.png"
        image.save(paths[mode])
    return paths


def _write_json(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1), encoding="utf-8")
    return path


# ---------------------------------------------------------------- V* Bench
VSTAR_RECORDS: dict[str, tuple[str, dict[str, Any]]] = {
    "direct_attributes/sa_astronaut": ("astronaut", {
        "question": "What is the color of the flag on the astronaut's suit?",
        "options": ["red, white and blue", "green", "black", "yellow"],
        "target_object": ["flag", "patch"], "bbox": [[20, 30, 40, 50], [100, 120, 30, 20]]}),
    "direct_attributes/sa_coffee": ("coffee", {
        "question": "What is the color of the cup?", "options": ["white", "red", "blue", "green"],
        "target_object": ["cup"], "bbox": [[60, 40, 150, 120]]}),
    "direct_attributes/sa_chelsea": ("chelsea", {
        "question": "What is the color of the cat's eyes?", "options": ["yellow-green", "blue", "brown", "grey"],
        "target_object": ["cat"], "bbox": [[90, 50, 120, 90]]}),
    "relative_position/sa_rocket": ("rocket", {
        "question": "Is the rocket on the left or right side of the launch tower?", "options": ["right", "left"],
        "target_object": ["rocket", "launch tower"], "bbox": [[110, 10, 40, 180], [150, 5, 60, 190]]}),
    "relative_position/sa_coins": ("coins", {
        "question": "Is the largest coin above or below the smallest coin?", "options": ["below", "above"],
        "target_object": ["largest coin", "smallest coin"], "bbox": [[200, 150, 50, 50], [30, 20, 25, 25]]}),
}


def make_vstar_folder(tmp_path: Path) -> Path:
    """A V* Bench folder: ``direct_attributes/`` and ``relative_position/`` with ``.jpg`` + ``.json`` pairs."""
    root = tmp_path / "vstar_bench"
    for key, (name, record) in VSTAR_RECORDS.items():
        save_image(photo(name), root / f"{key}.jpg")
        _write_json(root / f"{key}.json", record)
    return root


# ---------------------------------------------------------------- TallyQA
TALLYQA_IMAGES = {"VG_100K/1.jpg": "coins", "VG_100K_2/2.jpg": "astronaut",
                  "val2014/COCO_val2014_000000000003.jpg": "chelsea"}
TALLYQA_SPLITS: dict[str, list[dict[str, Any]]] = {
    "test": [
        {"image": "VG_100K/1.jpg", "question": "How many coins are in the top row?", "answer": 6,
         "issimple": False, "question_id": 101, "image_id": 1, "data_source": "amt"},
        {"image": "VG_100K/1.jpg", "question": "How many coins are there?", "answer": 24,
         "issimple": True, "question_id": 102, "image_id": 1, "data_source": "imported_genome"},
        {"image": "VG_100K_2/2.jpg", "question": "How many flags are on the suit?", "answer": 1,
         "issimple": False, "question_id": 103, "image_id": 2, "data_source": "amt"},
        {"image": "val2014/COCO_val2014_000000000003.jpg", "question": "How many cats have open eyes?",
         "answer": 1, "issimple": False, "question_id": 104, "image_id": 3, "data_source": "amt"},
        {"image": "val2014/COCO_val2014_000000000003.jpg", "question": "How many dogs are there?",
         "answer": 0, "issimple": True, "question_id": 105, "image_id": 3, "data_source": "imported_vqa"},
    ],
    "train": [
        {"image": "VG_100K_2/2.jpg", "question": "How many people are there?", "answer": 1,
         "issimple": True, "question_id": 1, "image_id": 2, "data_source": "imported_genome"},
        {"image": "VG_100K/1.jpg", "question": "How many coins are darker than the rest?", "answer": 3,
         "issimple": False, "question_id": 2, "image_id": 1, "data_source": "amt"},
    ],
}


def make_tallyqa_folder(tmp_path: Path) -> Path:
    """A TallyQA folder: ``train.json``, ``test.json`` and the images they name, under it."""
    root = tmp_path / "tallyqa"
    for rel, name in TALLYQA_IMAGES.items():
        save_image(photo(name), root / rel)
    for split, records in TALLYQA_SPLITS.items():
        _write_json(root / f"{split}.json", records)
    return root


# ---------------------------------------------------------------- InfographicsVQA
INFOVQA_ANNOTATION = "infographicsVQA_val_v1.0_withQT.json"
INFOVQA_RECORDS: list[dict[str, Any]] = [
    {"questionId": 65718, "question": "What is the title of the first section?", "image_local_name": "page.png",
     "answers": ["Region-based segmentation", "region based segmentation"], "answer_type": ["single span"],
     "question_type": ["Figure/diagram"]},
    {"questionId": 65719, "question": "How many coins are shown?", "image_local_name": "coins.png",
     "answers": ["24"], "answer_type": ["non-extractive"], "question_type": ["Visual/Layout"]},
    {"questionId": 65720, "question": "What vehicle is shown?", "image_local_name": "rocket.jpg",
     "answers": ["rocket", "a rocket"], "answer_type": ["non-extractive"], "question_type": ["Visual/Layout"]},
]


def make_infovqa_folder(tmp_path: Path) -> Path:
    """An InfographicsVQA folder: one annotation JSON and an ``images/`` folder (grayscale PNGs included)."""
    root = tmp_path / "infovqa"
    import skimage.data

    save_image(skimage.data.page(), root / "images" / "page.png")
    save_image(photo("coins")[:, :, 0], root / "images" / "coins.png")
    save_image(photo("rocket"), root / "images" / "rocket.jpg")
    _write_json(root / INFOVQA_ANNOTATION, {"dataset_name": "infographicVQA", "dataset_split": "val",
                                           "data": INFOVQA_RECORDS})
    return root


# ---------------------------------------------------------------- MVBench
MVBENCH_TASKS: dict[str, list[dict[str, Any]]] = {
    "action_sequence": [
        {"video": "A1.mp4", "question": "What did the camera do first?",
         "candidates": ["Panned right.", "Panned left.", "Zoomed in.", "Stayed still."], "answer": "Panned right.",
         "start": 0.5, "end": 2.5},
        {"video": "A2.mp4", "question": "What is shown at the end?",
         "candidates": ["A cat.", "A rocket.", "A cup."], "answer": "A rocket.", "start": 1.0, "end": 3.0},
    ],
    "episodic_reasoning": [
        {"video": "clip_1", "question": "Who appears in the clip?", "candidates": ["A dog.", "A cat."],
         "answer": "A cat.", "start": 1.0, "end": 3.0},
    ],
    "my_task": [
        {"video": "own.mp4", "question": "Which way does the view move?", "candidates": ["Up.", "Right.", "Down."],
         "answer": "Right."},
        {"video": "shared.mp4", "question": "What is in the video?", "candidates": ["Coffee.", "Coins."],
         "answer": "Coffee."},
    ],
}
MVBENCH_FRAME_FOLDER_FRAMES = 12  # 4 s at 3 frames per second


def make_mvbench_folder(tmp_path: Path) -> Path:
    """An MVBench folder: ``json/<task>.json`` and videos under ``video/``.

    ``action_sequence`` videos sit in the benchmark's own folder (``video/star/Charades_v1_480/``),
    ``episodic_reasoning`` is a folder of JPEG frames, and ``my_task`` (not a benchmark task)
    has one video in ``video/my_task/`` and one directly in ``video/``.
    """
    root = tmp_path / "mvbench"
    for task, records in MVBENCH_TASKS.items():
        _write_json(root / "json" / f"{task}.json", records)
    write_clip(root / "video/star/Charades_v1_480/A1.mp4", "astronaut")
    write_clip(root / "video/star/Charades_v1_480/A2.mp4", "rocket")
    write_clip(root / "video/my_task/own.mp4", "chelsea")
    write_clip(root / "video/shared.mp4", "coffee")
    frames = panning_frames("chelsea", count=MVBENCH_FRAME_FOLDER_FRAMES)
    for i, frame in enumerate(frames, start=1):
        save_image(frame, root / f"video/tvqa/frames_fps3_hq/clip_1/{i:05d}.jpg")
    return root


# ---------------------------------------------------------------- Pixel Reasoner parquet
PARQUET_FRAMES = 8
PARQUET_ROWS: list[dict[str, Any]] = [
    {"qid": "vstar-0", "image": ["images/vstar_astronaut.jpg"], "answer": "B", "is_video": False,
     "question": "What is the color of the flag on the suit?\nOptions:\n(A) green\n(B) red, white and blue\n"
                 "(C) black\n(D) yellow\nAnswer with the option's letter from the given choices directly."},
    {"qid": "tallyqa-7", "image": ["images/tallyqa_coins.jpg"], "answer": "24", "is_video": False,
     "question": "How many coins are there?"},
    {"qid": "infovqa-3", "image": ["images/infovqa_page.png"], "answer": "Region-based segmentation",
     "is_video": False, "question": "What is the title of the first section?"},
    {"qid": "chart-1", "image": ["images/chart_coffee.jpg"], "answer": "white", "is_video": False,
     "question": "What color is the cup?"},
    {"qid": "mvbench-5", "image": [f"images/mvbench_clip/{i:02d}.jpg" for i in range(PARQUET_FRAMES)],
     "answer": "C", "is_video": True,
     "question": "Which way does the camera move? (A) up (B) down (C) right"},
]


def make_parquet_file(tmp_path: Path) -> Path:
    """A Pixel Reasoner evaluation parquet beside the ``images/`` it lists; returns the parquet path."""
    root = tmp_path / "pr_eval"
    save_image(photo("astronaut"), root / "images/vstar_astronaut.jpg")
    save_image(photo("coins"), root / "images/tallyqa_coins.jpg")
    save_image(photo("page"), root / "images/infovqa_page.png")
    save_image(photo("coffee"), root / "images/chart_coffee.jpg")
    for i, frame in enumerate(panning_frames("rocket", count=PARQUET_FRAMES)):
        save_image(frame, root / f"images/mvbench_clip/{i:02d}.jpg")
    return write_parquet(root / "eval.parquet", PARQUET_ROWS)


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` (dicts with the same keys) as a parquet table; column types are inferred."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------- our JSONL
JSONL_RECORDS: list[dict[str, Any]] = [
    {"id": "flag", "question": "What is the color of the flag?", "image": "media/astronaut.jpg", "answers": "B",
     "answer_type": "choice", "choices": ["green", "red, white and blue", "black"], "evidence_box": [20, 30, 60, 80],
     "family": "mine/attributes"},
    {"id": "coins", "question": "How many coins are there?", "image": "media/coins.png", "answers": [24],
     "answer_type": "number", "answerable_without_ops": True},
    {"id": "title", "question": "What is the title of the first section?", "image": "media/page.png",
     "answers": ["Region-based segmentation"], "answer_type": "anls", "meta": {"source": "skimage page"}},
    {"id": "pan", "question": "Which way does the view move?", "video": "media/pan.mp4", "answers": ["A"],
     "answer_type": "choice", "choices": ["right", "left"], "evidence_frames": [2, 3], "video_window": [0.5, 2.5],
     "num_frames": 8},
]


def make_jsonl_file(tmp_path: Path) -> Path:
    """A JSONL file in our format (docs/datasets.md) with its ``media/`` folder; returns the file path."""
    root = tmp_path / "mine"
    save_image(photo("astronaut"), root / "media/astronaut.jpg")
    save_image(photo("coins")[:, :, 0], root / "media/coins.png")
    save_image(photo("page"), root / "media/page.png")
    write_clip(root / "media/pan.mp4", "coffee")
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in JSONL_RECORDS), encoding="utf-8")
    return path
