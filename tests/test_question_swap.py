"""The question-swap probe: renaming the asked object, and telling a question-reading pointer from one that is not."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from agents.question_swap import SWAP_TASKS, question_swap, summarize, swap_for
from agents.sft import ZOOM_EASY, BoxSnapper, box_vocab, task_source
from agents.traces import TraceOptions, play_traces
from agents.vlm.chat import ChatFormat
from agents.vlm.tiny import build_tiny_model, build_tiny_processor
from pxr_env.actions import format_tool_call

IDS = [f"zoom-read/{seed}" for seed in range(10, 22)] + [f"chart/{seed}" for seed in range(10, 22)]


def test_swap_names_another_object_of_the_image() -> None:
    source = task_source(SWAP_TASKS)
    for sample_id in IDS:
        sample = source.get(sample_id)
        swap = swap_for(sample)
        assert swap is not None and sample.question.count(swap.phrase) == 1
        assert swap.replacement != swap.phrase and swap.other_box != tuple(sample.evidence_box)
        named = swap.replacement.removeprefix("the ")
        if sample.family == "zoom-read":
            assert any(f"{t['colour']} {t['shape']}" == named and tuple(t["box"]) == swap.other_box
                       for t in sample.meta["tags"] if not t["target"])
        else:
            assert any(f"{v['colour']} bar" == named and tuple(v["box"]) == swap.other_box
                       for v in sample.meta["values"] if not v["target"])
    pages = task_source({"chart": {"questions": ["poster", "table"], "shortcut_share": 0.0}})
    for seed in range(10, 22):  # panels are renamed by heading, table cells by row and column
        sample = pages.get(f"chart/{seed}")
        swap = swap_for(sample)
        assert swap is not None and sample.question.count(swap.phrase) == 1
        other = next(v for v in sample.meta["values"] if tuple(v["box"]) == swap.other_box)
        assert not other["target"]
        if sample.meta["kind"] == "poster":
            assert swap.replacement == f"the {other['heading']} panel"
        else:
            assert swap.replacement == f"for {other['row']} in {other['column']}"
            assert other["row"] != sample.meta["target"]["row"] and other["column"] != sample.meta["target"]["column"]
    easy = task_source(ZOOM_EASY)
    assert swap_for(easy.get("zoom-read/10")) is None  # the only tag: nothing to rename it into


class _Scripted(torch.nn.Module):
    """Writes a crop of the object its prompt's question names (`reads`), or always of the first
    question's object, as a pointer that finds the salient object whatever is asked."""

    def __init__(self, processor, boxes: dict[str, tuple[float, float, float, float]], reads: bool) -> None:
        super().__init__()
        self.processor, self.boxes, self.reads = processor, boxes, reads
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(box_token_start_id=None)  # writes boxes as numbers: no box distribution

    def generate(self, input_ids, **kwargs):
        rows = []
        for ids in input_ids:
            prompt = self.processor.tokenizer.decode(ids)
            asked = [question for question in self.boxes if question in prompt] if self.reads else list(self.boxes)
            box = self.boxes[asked[0]]
            text = format_tool_call("crop_image", {"bbox_2d": [round(v, 3) for v in box], "target_image": 1})
            rows.append(self.processor.tokenizer(text, return_tensors="pt")["input_ids"][0])
        width = max(len(r) for r in rows)
        pad = self.processor.tokenizer.pad_token_id
        new = torch.stack([torch.cat([r, torch.full((width - len(r),), pad)]) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_probe_tells_a_pointer_that_reads_the_question_from_one_that_does_not() -> None:
    processor = build_tiny_processor()
    source = task_source(SWAP_TASKS)
    traces = play_traces(source, IDS[::3], options=TraceOptions(chat_format=ChatFormat(question_first=True)))
    assert {t.sample_id.split("/")[0] for t in traces} == {"zoom-read", "chart"}
    reading, fixed = [], []
    for trace in traces:  # one item at a time: the scripted model tells the objects apart by question text
        sample = source.get(trace.sample_id)
        height, width = sample.load_image().shape[:2]
        swap = swap_for(sample)
        boxes = {question: (x1 / width, y1 / height, x2 / width, y2 / height) for question, (x1, y1, x2, y2)
                 in ((sample.question, sample.evidence_box),
                     (sample.question.replace(swap.phrase, swap.replacement), swap.other_box))}
        reading += question_swap(_Scripted(processor, boxes, reads=True), processor, [trace], source, 0.0)
        fixed += question_swap(_Scripted(processor, boxes, reads=False), processor, [trace], source, 0.0)

    reading, fixed = summarize(reading), summarize(fixed)
    assert reading["items"] == len(traces) >= 6
    assert reading["hit"] == 1.0 and reading["follows"] == 1.0 and reading["changed"] == 1.0
    assert reading["stays"] == 0.0
    assert fixed["hit"] == 1.0 and fixed["stays"] == 1.0
    assert fixed["changed"] == 0.0 and fixed["follows"] == 0.0


def test_probe_measures_how_far_the_question_moves_a_box_token_model() -> None:
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=0, hidden_size=64, intermediate_size=128, vision_num_layers=1,
                             pointer_question=True).eval()
    source = task_source(SWAP_TASKS)
    options = TraceOptions(box_writer=BoxSnapper(box_vocab(model.config)), chat_format=ChatFormat(question_first=True))
    traces = play_traces(source, ["zoom-read/10", "chart/10"], options=options)
    rows = question_swap(model, processor, traces, source, 0.02)
    assert len(rows) == 2 and all(0.0 <= r["tv"] <= 1.0 for r in rows)
    with torch.no_grad():  # a gate that reads the question moves the box distribution further
        model.pointer.question.weight.normal_(0, 1.0)
    moved = question_swap(model, processor, traces, source, 0.02)
    assert summarize(moved)["tv"] > summarize(rows)["tv"]
