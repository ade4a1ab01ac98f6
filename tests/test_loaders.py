"""Dataset loaders: every format read from fixture folders; bad input refused, naming the record."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures import (
    INFOVQA_ANNOTATION,
    INFOVQA_RECORDS,
    JSONL_RECORDS,
    MVBENCH_FRAME_FOLDER_FRAMES,
    MVBENCH_TASKS,
    PARQUET_FRAMES,
    PARQUET_ROWS,
    TALLYQA_SPLITS,
    VIDEO_SIZE,
    VSTAR_RECORDS,
    make_infovqa_folder,
    make_jsonl_file,
    make_mvbench_folder,
    make_parquet_file,
    make_tallyqa_folder,
    make_vstar_folder,
    photo,
    save_image,
    write_mode_images,
    write_parquet,
    write_png_header,
)
from pxr_env.images import MediaError
from pxr_env.tasks import CHOICE_LETTERS, DATASET_LOADERS, make_task_source
from pxr_env.tasks.loaders import LOADERS, AnnotationError, FrameFilesSample, split_options


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture folder, built once for the read-only tests of this module."""
    base = tmp_path_factory.mktemp("datasets")
    return {
        "vstar": make_vstar_folder(base), "tallyqa": make_tallyqa_folder(base),
        "infovqa": make_infovqa_folder(base), "mvbench": make_mvbench_folder(base),
        "pixel-reasoner-parquet": make_parquet_file(base), "jsonl": make_jsonl_file(base),
    }


def gold_text(sample) -> str:
    """The text of a choice sample's correct option."""
    return sample.choices[CHOICE_LETTERS.index(sample.answers[0])]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_loaders_cover_every_dataset_name():
    assert set(LOADERS) == set(DATASET_LOADERS)


# ---------------------------------------------------------------- V* Bench
def test_vstar_shuffles_options_and_letters_the_first_one(built):
    source = make_task_source({"vstar": str(built["vstar"])})
    assert len(source) == len(VSTAR_RECORDS)
    letters = set()
    for key, (_, record) in VSTAR_RECORDS.items():
        sample = source.get(f"vstar/{key}")
        assert sample.family == "vstar" and sample.meta["task"] == key.split("/")[0]
        assert sample.answer_type == "choice" and sorted(sample.choices) == sorted(record["options"])
        assert gold_text(sample) == record["options"][0]
        assert sample.meta["target_object"] == record["target_object"]
        letters.add(sample.answers[0])
    assert letters != {"A"}, "options were not shuffled"
    astronaut = source.get("vstar/direct_attributes/sa_astronaut")
    assert astronaut.evidence_box == (20, 30, 130, 140)  # union of [20,30,40,50] and [100,120,30,20]
    image = astronaut.load_image()
    assert image.dtype == np.uint8 and image.shape == photo("astronaut").shape


def test_vstar_order_depends_on_seed_and_record_only(built, tmp_path):
    key = "direct_attributes/sa_coffee"
    first = make_task_source({"vstar": str(built["vstar"])}).get(f"vstar/{key}")
    again = make_task_source({"vstar": {"path": built["vstar"], "seed": 0}}).get(f"vstar/{key}")
    assert first.choices == again.choices
    alone = tmp_path / "one" / "direct_attributes"
    alone.mkdir(parents=True)
    for suffix in (".jpg", ".json"):
        shutil.copy(built["vstar"] / f"{key}{suffix}", alone / f"sa_coffee{suffix}")
    assert LOADERS["vstar"](tmp_path / "one").get(f"vstar/{key}").choices == first.choices
    orders = {LOADERS["vstar"](built["vstar"], seed=s).get(f"vstar/{key}").choices for s in range(8)}
    assert len(orders) > 1


def test_vstar_needs_its_task_folders(tmp_path):
    with pytest.raises(ValueError, match="direct_attributes"):
        LOADERS["vstar"](tmp_path)


# ---------------------------------------------------------------- TallyQA
@pytest.mark.parametrize("split, subset, expected", [
    ("test", "complex", [101, 103, 104]), ("test", "simple", [102, 105]),
    ("test", "all", [101, 102, 103, 104, 105]), ("train", "all", [1, 2]),
])
def test_tallyqa_splits_and_subsets(built, split, subset, expected):
    source = make_task_source({"tallyqa": {"path": built["tallyqa"], "split": split, "subset": subset}})
    assert [s.sample_id for s in source.samples] == [f"tallyqa/{q}" for q in expected]
    by_id = {r["question_id"]: r for r in TALLYQA_SPLITS[split]}
    for sample in source.samples:
        record = by_id[int(sample.sample_id.split("/")[1])]
        assert sample.answers == (str(record["answer"]),) and sample.answer_type == "number"
        assert sample.family == "tallyqa" and sample.question == record["question"]
        assert sample.image == (built["tallyqa"] / record["image"]).resolve()


def test_tallyqa_reads_images_from_image_root(built, tmp_path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    shutil.copy(built["tallyqa"] / "test.json", annotations / "test.json")
    source = LOADERS["tallyqa"](annotations, image_root=built["tallyqa"])
    assert source.get("tallyqa/101").load_image().shape == photo("coins").shape
    with pytest.raises(MediaError, match="1.jpg"):
        LOADERS["tallyqa"](annotations)


def test_tallyqa_refuses_unknown_subset(built):
    with pytest.raises(ValueError, match="subset"):
        LOADERS["tallyqa"](built["tallyqa"], subset="hard")


# ---------------------------------------------------------------- InfographicsVQA
def test_infovqa_folder_with_images(built):
    source = make_task_source({"infovqa": built["infovqa"]})
    assert len(source) == len(INFOVQA_RECORDS)
    for record in INFOVQA_RECORDS:
        sample = source.get(f"infovqa/{record['questionId']}")
        assert sample.answer_type == "anls" and sample.family == "infovqa"
        assert sample.answers == tuple(record["answers"])
        assert sample.meta["answer_type"] == record["answer_type"]
    page = source.get("infovqa/65718").load_image()  # a grayscale PNG
    assert page.shape[2] == 3 and np.array_equal(page[..., 0], page[..., 2])


def test_infovqa_file_or_named_annotation(built, tmp_path):
    by_file = LOADERS["infovqa"](built["infovqa"] / INFOVQA_ANNOTATION)
    folder = tmp_path / "two"
    shutil.copytree(built["infovqa"], folder)
    shutil.copy(folder / INFOVQA_ANNOTATION, folder / "other.json")
    with pytest.raises(ValueError, match="annotation="):
        LOADERS["infovqa"](folder)
    by_name = LOADERS["infovqa"](folder, annotation=INFOVQA_ANNOTATION)
    assert [s.sample_id for s in by_file.samples] == [s.sample_id for s in by_name.samples]


def test_infovqa_record_without_answers_is_reported(tmp_path):
    root = make_infovqa_folder(tmp_path)
    content = json.loads((root / INFOVQA_ANNOTATION).read_text())
    del content["data"][1]["answers"]
    (root / INFOVQA_ANNOTATION).write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match=rf"{INFOVQA_ANNOTATION}, record 1: .*answers"):
        LOADERS["infovqa"](root)


# ---------------------------------------------------------------- MVBench
def test_mvbench_tasks_letters_windows_and_video_folders(built):
    source = make_task_source({"mvbench": built["mvbench"]})
    assert len(source) == sum(len(r) for r in MVBENCH_TASKS.values())
    for task, records in MVBENCH_TASKS.items():
        for i, record in enumerate(records):
            sample = source.get(f"mvbench/{task}/{i}")
            assert sample.family == "mvbench" and sample.meta["task"] == task and sample.is_video
            assert sample.choices == tuple(record["candidates"]) and gold_text(sample) == record["answer"]
            expected_window = (record["start"], record["end"]) if "start" in record else None
            assert sample.video_window == expected_window
    root = built["mvbench"].resolve()
    assert source.get("mvbench/action_sequence/0").video == root / "video/star/Charades_v1_480/A1.mp4"
    assert source.get("mvbench/my_task/0").video == root / "video/my_task/own.mp4"
    assert source.get("mvbench/my_task/1").video == root / "video/shared.mp4"


def test_mvbench_decodes_sixteen_frames_at_reset(built):
    sample = LOADERS["mvbench"](built["mvbench"], tasks=["action_sequence"]).get("mvbench/action_sequence/0")
    frames = sample.load_frames()
    assert frames.shape == (16, *VIDEO_SIZE, 3) and frames.dtype == np.uint8


def test_mvbench_frame_folder_is_cut_to_its_window(built):
    sample = LOADERS["mvbench"](built["mvbench"]).get("mvbench/episodic_reasoning/0")
    assert isinstance(sample, FrameFilesSample)
    # frames i (0-based) at 3 fps with 1.0 <= i / 3 <= 3.0: i = 3..9
    assert [p.name for p in sample.frame_files] == [f"{i + 1:05d}.jpg" for i in range(3, 10)]
    assert len(sample.frame_files) < MVBENCH_FRAME_FOLDER_FRAMES
    assert sample.num_frames == 7 and sample.load_frames().shape == (7, *VIDEO_SIZE, 3)


def test_mvbench_task_choice_and_video_dirs(built, tmp_path):
    assert len(LOADERS["mvbench"](built["mvbench"], tasks=["my_task"])) == 2
    with pytest.raises(ValueError, match="available"):
        LOADERS["mvbench"](built["mvbench"], tasks=["no_such_task"])
    root = tmp_path / "mv"
    shutil.copytree(built["mvbench"], root)
    (root / "video/custom").mkdir()
    (root / "video/my_task/own.mp4").rename(root / "video/custom/own.mp4")
    with pytest.raises(MediaError, match="own.mp4"):
        LOADERS["mvbench"](root, tasks=["my_task"])
    source = LOADERS["mvbench"](root, tasks=["my_task"], video_dirs={"my_task": "video/custom"})
    assert source.get("mvbench/my_task/0").video == (root / "video/custom/own.mp4").resolve()


def test_mvbench_answer_outside_candidates_is_reported(tmp_path):
    root = make_mvbench_folder(tmp_path)
    records = json.loads((root / "json/my_task.json").read_text())
    records[1]["answer"] = "Tea."
    (root / "json/my_task.json").write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"my_task.json, record 1: answer 'Tea.'"):
        LOADERS["mvbench"](root)


# ---------------------------------------------------------------- Pixel Reasoner parquet
def test_parquet_answer_types_choices_and_families(built):
    source = make_task_source({"pixel-reasoner-parquet": built["pixel-reasoner-parquet"]})
    assert len(source) == len(PARQUET_ROWS)
    get = {s.meta["qid"]: s for s in source.samples}
    vstar = get["vstar-0"]
    assert vstar.family == "vstar" and vstar.answer_type == "choice"
    assert vstar.choices == ("green", "red, white and blue", "black", "yellow")
    assert gold_text(vstar) == "red, white and blue"
    assert vstar.question == ("What is the color of the flag on the suit?\n"
                              "Answer with the option's letter from the given choices directly.")
    assert (get["tallyqa-7"].answer_type, get["tallyqa-7"].answers) == ("number", ("24",))
    assert get["infovqa-3"].answer_type == "anls" and get["chart-1"].answer_type == "text"
    assert vstar.sample_id == "pixel-reasoner-parquet/vstar-0"
    assert vstar.load_image().shape == photo("astronaut").shape


def test_parquet_video_rows_are_frame_lists(built):
    sample = LOADERS["pixel-reasoner-parquet"](built["pixel-reasoner-parquet"]).get("pixel-reasoner-parquet/mvbench-5")
    assert isinstance(sample, FrameFilesSample) and sample.is_video and sample.num_frames == PARQUET_FRAMES
    assert sample.choices == ("up", "down", "right") and gold_text(sample) == "right"
    assert sample.load_frames().shape == (PARQUET_FRAMES, *VIDEO_SIZE, 3)
    fewer = LOADERS["pixel-reasoner-parquet"](built["pixel-reasoner-parquet"], num_frames=3)
    assert fewer.get("pixel-reasoner-parquet/mvbench-5").load_frames().shape[0] == 3


def test_parquet_folder_list_answers_and_root(built, tmp_path):
    folder = built["pixel-reasoner-parquet"].parent
    assert len(LOADERS["pixel-reasoner-parquet"](folder)) == len(PARQUET_ROWS)
    rows = [{**r, "answer": [r["answer"], r["answer"].lower()]} for r in PARQUET_ROWS if r["qid"] == "chart-1"]
    source = LOADERS["pixel-reasoner-parquet"](write_parquet(tmp_path / "lists.parquet", rows), root=folder)
    assert source.get("pixel-reasoner-parquet/chart-1").answers == ("white", "white")
    with pytest.raises(MediaError, match="chart_coffee.jpg"):
        LOADERS["pixel-reasoner-parquet"](tmp_path / "lists.parquet")


def test_parquet_missing_column_is_named(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [{"question": "q?", "image": ["a.jpg"], "answer": "1"}])
    with pytest.raises(AnnotationError, match="qid"):
        LOADERS["pixel-reasoner-parquet"](path)


def test_split_options_needs_a_and_b_in_order():
    assert split_options("Pick one: (A) x, (B) y") == ("Pick one:", ("x", "y"))
    assert split_options("What does (B) mean? (A) only") is None


# ---------------------------------------------------------------- JSONL
def test_jsonl_every_field(built):
    source = make_task_source({"jsonl": built["jsonl"]})
    assert len(source) == len(JSONL_RECORDS)
    flag = source.get("jsonl/flag")
    assert flag.family == "mine/attributes" and gold_text(flag) == "red, white and blue"
    assert flag.evidence_box == (20, 30, 60, 80)
    coins = source.get("jsonl/coins")
    assert coins.answers == ("24",) and coins.answerable_without_ops is True and coins.family == "jsonl"
    assert source.get("jsonl/title").meta == {"source": "skimage page"}
    pan = source.get("jsonl/pan")
    assert pan.video_window == (0.5, 2.5) and pan.evidence_frames == (2, 3) and pan.num_frames == 8
    assert pan.load_frames().shape == (8, *VIDEO_SIZE, 3)


@pytest.mark.parametrize("change, message", [
    ({"answer": "B"}, r"unknown field\(s\) \['answer'\]"),
    ({"video": "media/pan.mp4"}, "exactly one of 'image' and 'video'"),
    ({"answer_type": "bool"}, "answer_type"),
    ({"answers": "E"}, "choice answers must be letters"),
    ({"evidence_box": [60, 30, 20, 80]}, "x1 < x2"),
    ({"id": None}, "'id' is missing"),
])
def test_jsonl_bad_line_names_the_line(built, tmp_path, change, message):
    records = [dict(r) for r in JSONL_RECORDS]
    records[0] = {k: v for k, v in {**records[0], **change}.items() if v is not None}
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(AnnotationError, match=rf"bad.jsonl, line 1: .*{message}"):
        LOADERS["jsonl"](path, root=built["jsonl"].parent)


def test_jsonl_syntax_error_and_duplicate_ids(built):
    path = built["jsonl"].parent / "syntax.jsonl"
    path.write_text(json.dumps(JSONL_RECORDS[1]) + "\n\n{not json\n")
    with pytest.raises(AnnotationError, match="syntax.jsonl, line 3: not valid JSON"):
        LOADERS["jsonl"](path)
    dup = write_jsonl(built["jsonl"].parent / "dup.jsonl", [JSONL_RECORDS[1], JSONL_RECORDS[1]])
    with pytest.raises(AnnotationError, match=r"dup.jsonl, line 2: sample id 'jsonl/coins' was already given .*line 1"):
        LOADERS["jsonl"](dup)


# ---------------------------------------------------------------- bad input
def _escape_case(fmt: str, tmp_path: Path) -> Path:
    """A dataset of format `fmt` whose first record's media path leaves the dataset folder."""
    outside = save_image(photo("coins"), tmp_path / "outside.jpg")  # exists, so only the escape is wrong
    if fmt == "tallyqa":
        root = make_tallyqa_folder(tmp_path)
        records = json.loads((root / "test.json").read_text())
        records[0]["image"] = "../outside.jpg"
        (root / "test.json").write_text(json.dumps(records))
        return root
    if fmt == "infovqa":
        root = make_infovqa_folder(tmp_path)
        content = json.loads((root / INFOVQA_ANNOTATION).read_text())
        content["data"][0]["image_local_name"] = str(outside)  # an absolute path
        (root / INFOVQA_ANNOTATION).write_text(json.dumps(content))
        return root
    if fmt == "mvbench":
        root = tmp_path / "mv"
        (root / "json").mkdir(parents=True)
        (root / "video").mkdir()
        record = {**MVBENCH_TASKS["my_task"][0], "video": "../../outside.jpg"}
        (root / "json/my_task.json").write_text(json.dumps([record]))
        return root
    if fmt == "pixel-reasoner-parquet":
        return write_parquet(tmp_path / "pr/eval.parquet", [{**PARQUET_ROWS[1], "image": ["../outside.jpg"]}])
    if fmt == "jsonl":
        (tmp_path / "j").mkdir()
        return write_jsonl(tmp_path / "j/q.jsonl", [{**JSONL_RECORDS[1], "image": "../outside.jpg"}])
    root = tmp_path / "vs"
    (root / "direct_attributes").mkdir(parents=True)
    (root / "direct_attributes/x.json").write_text(json.dumps(VSTAR_RECORDS["direct_attributes/sa_coffee"][1]))
    os.symlink(outside, root / "direct_attributes/x.jpg")  # a symlink out of the folder
    return root


@pytest.mark.parametrize("fmt", sorted(DATASET_LOADERS))
def test_paths_escaping_the_dataset_folder_are_refused(fmt, tmp_path):
    path = _escape_case(fmt, tmp_path)
    with pytest.raises(MediaError, match="escapes the dataset folder"):
        LOADERS[fmt](path)


def test_malformed_record_raises_with_index_or_is_skipped_with_a_warning(tmp_path):
    root = make_tallyqa_folder(tmp_path)
    records = json.loads((root / "test.json").read_text())
    del records[3]["question"]
    records[4] = "not a record"
    (root / "test.json").write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"test.json, record 3: field 'question' is missing"):
        LOADERS["tallyqa"](root, subset="all")
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 records(.|\n)*record 3(.|\n)*record 4"):
        source = LOADERS["tallyqa"](root, subset="all", on_error="skip")
    assert [s.sample_id for s in source.samples] == ["tallyqa/101", "tallyqa/102", "tallyqa/103"]
    with pytest.raises(ValueError, match="on_error"):
        LOADERS["tallyqa"](root, on_error="ignore")


def test_invalid_json_file_is_named(tmp_path):
    root = make_tallyqa_folder(tmp_path)
    (root / "test.json").write_text('[{"image": ')
    with pytest.raises(AnnotationError, match="test.json is not valid JSON"):
        LOADERS["tallyqa"](root)


def test_missing_media_names_file_and_record_at_load(tmp_path):
    root = make_tallyqa_folder(tmp_path)
    (root / "VG_100K_2/2.jpg").unlink()
    with pytest.raises(MediaError, match=r"test.json, record 2: image file .*VG_100K_2/2.jpg"):
        LOADERS["tallyqa"](root)
    mv = make_mvbench_folder(tmp_path)
    (mv / "video/star/Charades_v1_480/A2.mp4").unlink()
    with pytest.raises(MediaError, match=r"action_sequence.json, record 1: video 'A2.mp4' is missing"):
        LOADERS["mvbench"](mv)
    vs = make_vstar_folder(tmp_path)
    (vs / "relative_position/sa_rocket.jpg").unlink()
    with pytest.raises(MediaError, match=r"sa_rocket.json: image file for relative_position/sa_rocket.json is missing"):
        LOADERS["vstar"](vs)


def test_corrupt_image_names_file_and_sample_at_reset(tmp_path):
    root = make_vstar_folder(tmp_path)
    (root / "direct_attributes/sa_chelsea.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    sample = LOADERS["vstar"](root).get("vstar/direct_attributes/sa_chelsea")  # loading only checks existence
    with pytest.raises(MediaError, match=r"sa_chelsea.jpg.*cannot be decoded.*vstar/direct_attributes/sa_chelsea"):
        sample.load_image()


def test_grayscale_palette_rgba_and_16_bit_images_convert(tmp_path):
    paths = write_mode_images(tmp_path / "media")
    records = [{"id": mode, "question": "How many coins?", "image": f"media/{path.name}", "answers": "24",
                "answer_type": "number"} for mode, path in paths.items()]
    source = LOADERS["jsonl"](write_jsonl(tmp_path / "modes.jsonl", records))
    images = {mode: source.get(f"jsonl/{mode}").load_image() for mode in paths}
    for image in images.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    gray = photo("coins", max_side=120)[:, :, 0]
    assert all(np.array_equal(images["gray"][..., c], gray) for c in range(3))
    assert np.array_equal(images["gray16"], images["gray"])  # 16-bit v*257 maps back to v
    expected_rgba = np.round(gray * (128 / 255) + 255 * (1 - 128 / 255))  # composited on white
    assert np.abs(images["rgba"][..., 0].astype(int) - expected_rgba).max() <= 1
    assert images["palette"].shape[:2] == photo("chelsea", max_side=120).shape[:2]


@pytest.mark.parametrize("side, message", [
    (9000, r"huge.png.*9000x9000.*above the limit.*jsonl/huge"),  # over our limit of 64 M pixels
    (20000, r"huge.png.*jsonl/huge"),  # PIL itself refuses it as a decompression bomb on opening
])
def test_huge_image_is_refused_before_decoding(tmp_path, side, message):
    write_png_header(tmp_path / "huge.png", side, side)  # its pixel data is a few bytes: decoding would fail
    record = {"id": "huge", "question": "What is it?", "image": "huge.png", "answers": "x", "answer_type": "text"}
    sample = LOADERS["jsonl"](write_jsonl(tmp_path / "q.jsonl", [record])).get("jsonl/huge")
    start = time.perf_counter()
    with pytest.raises(MediaError, match=message):
        sample.load_image()
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------- through the environment
@pytest.mark.parametrize("fmt", sorted(DATASET_LOADERS))
def test_one_episode_per_format_through_the_env(built, fmt):
    import gymnasium

    import pxr_env  # noqa: F401  (registers PixelQA-v0)

    source = make_task_source({fmt: built[fmt]})
    env = gymnasium.make("PixelQA-v0", tasks=source)
    try:
        video = [s for s in source.samples if s.is_video]
        for sample in [source.samples[0], *video[:1]]:
            obs, info = env.reset(seed=0, options={"sample_id": sample.sample_id})
            assert info["sample_id"] == sample.sample_id and obs["images"]
            obs, reward, terminated, truncated, info = env.step(f"\\boxed{{{sample.answers[0]}}}")
            assert terminated and not truncated and reward == 1.0 and info["correct"]
        env.reset(seed=1)
        *_, info = env.step("\\boxed{A}")
        assert "correct" in info
    finally:
        env.close()
