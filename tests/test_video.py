"""pxr_env.video: frame sampling, decoding (decord and the PyAV fallback), writing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pxr_env import video
from pxr_env.images import MediaError
from pxr_env.video import read_frames, sample_indices, write_video


def _ramp(n: int = 32, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """Frames whose gray level encodes their index (index * 7)."""
    frames = np.zeros((n, size[1], size[0], 3), np.uint8)
    frames[:] = (np.arange(n) * 7).astype(np.uint8)[:, None, None, None]
    return frames


def _indices(frames: np.ndarray) -> list[int]:
    return [int(round(float(f.mean()) / 7)) for f in frames]


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "ramp.mp4"
    write_video(path, _ramp(), fps=8.0)  # 32 frames: 4 s
    return path


def test_sample_indices_are_segment_midpoints() -> None:
    assert sample_indices(16, 8.0, 16).tolist() == list(range(16))
    assert sample_indices(32, 8.0, 4).tolist() == [4, 12, 20, 28]
    # [1 s, 2 s) at 8 fps is frames 8..15; four segments of two frames each.
    assert sample_indices(32, 8.0, 4, start=1.0, end=2.0).tolist() == [9, 11, 13, 15]
    assert sample_indices(4, 8.0, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_sample_indices_reject_bad_windows() -> None:
    with pytest.raises(ValueError, match="empty"):
        sample_indices(32, 8.0, 4, start=2.0, end=1.0)
    with pytest.raises(ValueError, match="after the end"):
        sample_indices(32, 8.0, 4, start=10.0)
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(32, 8.0, 0)


def test_round_trip_keeps_frames(ramp_video: Path) -> None:
    frames = read_frames(ramp_video, num_frames=32)
    assert frames.shape == (32, 48, 64, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - _ramp().astype(int)).max() <= 4
    assert _indices(read_frames(ramp_video, num_frames=4)) == [4, 12, 20, 28]


def test_start_and_end_are_honoured(ramp_video: Path) -> None:
    assert _indices(read_frames(ramp_video, num_frames=4, start=1.0, end=2.0)) == [9, 11, 13, 15]
    assert _indices(read_frames(ramp_video, num_frames=2, start=3.0)) == [26, 30]


def test_pyav_fallback_when_decord_is_missing(ramp_video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = read_frames(ramp_video, num_frames=5, start=0.5, end=3.5)
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    fallback = read_frames(ramp_video, num_frames=5, start=0.5, end=3.5)
    assert _indices(fallback) == _indices(expected)
    assert np.abs(fallback.astype(int) - expected.astype(int)).max() <= 2


def test_pyav_fallback_when_decord_fails(ramp_video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> np.ndarray:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(video, "_read_decord", broken)
    assert _indices(read_frames(ramp_video, num_frames=4)) == [4, 12, 20, 28]


def test_missing_file_names_file_and_context(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"nowhere\.mp4.*missing.*record 7"):
        read_frames(tmp_path / "nowhere.mp4", context="record 7")


def test_corrupt_file_names_file_and_context(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(MediaError, match=r"broken\.mp4.*cannot be decoded.*task 3"):
        read_frames(path, context="task 3")


def test_window_after_the_end_is_a_media_error(ramp_video: Path) -> None:
    with pytest.raises(MediaError, match="after the end"):
        read_frames(ramp_video, start=60.0)
    with pytest.raises(MediaError, match="not after start"):
        read_frames(ramp_video, start=2.0, end=1.0)


def test_write_video_validates_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "still.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=0)
    write_video(tmp_path / "sub" / "ok.mp4", _ramp(4))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ok.mp4"]
    assert not list(tmp_path.glob("*.mp4"))
