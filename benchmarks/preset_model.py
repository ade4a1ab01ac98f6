"""The warm-start preset's tiny model (fresh weights) and `image/single` zoom-read traces in its
chat format, shared by the step-time benchmarks."""

from __future__ import annotations

from typing import Any

from agents.sft import PRESETS, TINY_SYSTEM, box_vocab, trace_options
from agents.traces import Trace, TraceMix, synthesize_traces
from agents.vlm.chat import ChatFormat
from agents.vlm.tiny import BoxVocab, TinyVLMConfig, build_tiny_model, build_tiny_processor


def preset_model_and_traces(overrides: dict[str, Any], n_traces: int) -> tuple[Any, Any, list[Trace]]:
    """``(model, processor, traces)``: the preset's model shape with `overrides`, seed 0."""
    shape = PRESETS["warmstart"]["model"] | overrides
    boxes = box_vocab(TinyVLMConfig(**shape))
    processor = build_tiny_processor(boxes=None if boxes == BoxVocab() else boxes)
    model = build_tiny_model(processor, seed=0, **shape)
    chat = ChatFormat(system=TINY_SYSTEM, question_first=True)
    traces = synthesize_traces("zoom-read", n_traces, 0, mix=TraceMix(image={"image/single": 1.0}, video_share=0.0),
                               seed=0, options=trace_options(boxes, chat),
                               progress=False)
    return model, processor, traces
