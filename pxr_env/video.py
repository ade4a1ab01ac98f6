"""Video frame access: uniform frame sampling (decord first, PyAV fallback) and writing.

`read_frames` samples `num_frames` frames at the midpoints of equal segments of the video
(or of the ``[start, end]`` window in seconds), the MVBench convention. Any failure is a
`pxr_env.images.MediaError` naming the file and the caller's `context`.
"""

from __future__ import annotations

import os
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np

from pxr_env.images import MediaError

_CODECS = ("libx264", "h264", "mpeg4")


class WindowError(ValueError):
    """A time window that selects no frame of the video."""


def sample_indices(num_video_frames: int, fps: float, num_frames: int,
                   start: float | None = None, end: float | None = None) -> np.ndarray:
    """0-based indices of `num_frames` frames at segment midpoints of ``[start, end]`` seconds.

    Without a window the whole video is used. Indices repeat when the window holds fewer
    frames than asked for. Raises `WindowError` on an empty, inverted or too late window.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if num_video_frames < 1:
        raise ValueError("the video has no frames")
    first, last = 0, num_video_frames - 1
    if start is not None or end is not None:
        if fps <= 0:
            raise ValueError(f"cannot honour a time window: the video reports {fps} frames per second")
        lo = 0.0 if start is None else float(start)
        if lo < 0 or (end is not None and float(end) <= lo):
            raise WindowError(f"time window [{start}, {end}] s is empty or negative")
        first = int(round(lo * fps))
        if first > num_video_frames - 1:
            raise WindowError(
                f"time window starts at {lo:.2f} s, after the end of the video "
                f"({num_video_frames} frames at {fps:.2f} fps = {num_video_frames / fps:.2f} s)"
            )
        if end is not None:
            last = max(first, min(last, int(round(float(end) * fps)) - 1))
    span = last - first + 1
    segment = span / num_frames
    indices = first + np.floor(segment * (np.arange(num_frames) + 0.5)).astype(np.int64)
    return np.clip(indices, first, last)


def _read_decord(path: Path, num_frames: int, start: float | None, end: float | None) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    indices = sample_indices(len(reader), float(reader.get_avg_fps()), num_frames, start, end)
    return reader.get_batch(indices.tolist()).asnumpy()


def _read_pyav(path: Path, num_frames: int, start: float | None, end: float | None) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    indices = sample_indices(count, fps, num_frames, start, end)
    wanted = set(indices.tolist())
    decoded: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                decoded[i] = frame.to_ndarray(format="rgb24")
            if i >= indices.max():
                break
    if not decoded:
        raise ValueError("no frame could be decoded")
    # A container may announce more frames than it decodes: fall back to the last decoded one.
    available = np.array(sorted(decoded))
    picks = [available[np.searchsorted(available, i, side="right") - 1] if i not in decoded else i for i in indices]
    return np.stack([decoded[int(i)] for i in picks])


def read_frames(path: str | Path, num_frames: int = 16, start: float | None = None,
                end: float | None = None, context: str = "") -> np.ndarray:
    """`num_frames` frames of the video at `path`, as ``(T, H, W, 3)`` uint8.

    Frames sit at the midpoints of `num_frames` equal segments of the whole video, or of
    ``[start, end]`` (seconds) when given. decord is tried first; PyAV is used when decord
    is not installed or fails on the file. A missing or undecodable file raises
    `MediaError` naming the file and `context`.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    where = f" ({context})" if context else ""
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"video file {str(p)!r} is missing{where}")
    if start is not None and end is not None and end <= start:
        raise MediaError(f"video {str(p)!r}: time window end {end} is not after start {start}{where}")
    errors: list[str] = []
    for name, reader in (("decord", _read_decord), ("PyAV", _read_pyav)):
        try:
            frames = reader(p, num_frames, start, end)
        except WindowError as exc:
            raise MediaError(f"video {str(p)!r}: {exc}{where}") from exc
        except ImportError as exc:
            errors.append(f"{name} is not installed ({exc})")
            continue
        except Exception as exc:  # decoders raise many types for corrupt files
            errors.append(f"{name}: {exc}")
            continue
        return np.ascontiguousarray(frames, dtype=np.uint8)
    raise MediaError(f"video {str(p)!r} cannot be decoded{where}: " + "; ".join(errors))


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> None:
    """Encode ``(T, H, W, 3)`` uint8 `frames` to `path` with PyAV (H.264, else MPEG-4).

    The file is written under a temporary name in the same folder and renamed into place,
    so a concurrent reader never sees a half-written video and concurrent writers of the
    same file do not corrupt it. Sides must be even (yuv420p).
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame sides must be even for yuv420p video, got {width}x{height}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{target.suffix}")
    rate = Fraction(fps).limit_denominator(1000)
    try:
        with av.open(str(temporary), mode="w") as container:
            stream = _video_stream(container, rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def _video_stream(container: "av.container.OutputContainer", rate: Fraction) -> "av.VideoStream":
    """The first codec of `_CODECS` this PyAV build can encode, set for near-lossless quality."""
    errors = []
    for codec in _CODECS:
        try:
            stream = container.add_stream(codec, rate=rate)
        except Exception as exc:  # unknown or unavailable encoder
            errors.append(f"{codec}: {exc}")
            continue
        # High quality, single-threaded (deterministic output, small digits kept sharp).
        stream.options = {"crf": "12", "preset": "medium", "threads": "1"} if "264" in codec else {"qscale": "2"}
        stream.thread_count = 1
        return stream
    raise RuntimeError("PyAV cannot encode video with any of " + ", ".join(errors))
