"""Shared fixtures: a small in-memory task source with images, choices, counts and a video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pxr_env.tasks import DatasetSource, Sample


def _canvas(seed: int, size: tuple[int, int] = (600, 800)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(*size, 3), dtype=np.uint8)
    image[100:140, 500:540] = (220, 30, 30)
    return image


def make_fixture_source() -> DatasetSource:
    frames = np.zeros((16, 240, 320, 3), np.uint8)
    frames[5:8, 60:120, 80:160] = (0, 200, 0)
    samples = [
        Sample("fx/choice", "fx", "What colour is the small square?", ("B",), "choice",
               choices=("green", "red", "blue"), image=_canvas(0), evidence_box=(500, 100, 540, 140)),
        Sample("fx/count", "fx", "How many red squares are there?", ("1",), "number", image=_canvas(1),
               evidence_box=(500, 100, 540, 140)),
        Sample("fx/text", "fx", "What is written on the sign?", ("open sesame",), "anls", image=_canvas(2)),
        Sample("fx/small", "fx", "What colour is the image?", ("red",), "text", image=np.full((120, 120, 3), 200, np.uint8)),
        Sample("fx/video", "fx", "When does the green box appear?", ("A",), "choice",
               choices=("frames 6-8", "frames 1-3"), video=frames, evidence_frames=(6, 7, 8)),
    ]
    return DatasetSource("fx", samples)


@pytest.fixture
def fixture_source() -> DatasetSource:
    return make_fixture_source()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained, very small tiny-VLM checkpoint folder (model + processor)."""
    import agents.vlm.tiny as tiny

    path = tmp_path_factory.mktemp("tiny")
    processor = tiny.build_tiny_processor()
    model = tiny.build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, vision_num_layers=1)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
